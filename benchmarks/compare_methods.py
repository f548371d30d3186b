"""Every gradient-free method of rso_ext on the same model, data and budget, plus EvoTorch's PGPE.

    python benchmarks/compare_methods.py [--quick] [--data-root MNIST_DIR]

Methods: rso, sa, ticket (per-weight, :mod:`rso_ext.methods`), es, ga, dfo (population searches,
batched with torch.func.vmap) and evotorch (EvoTorch's PGPE: symmetric sampling, centred ranks,
Adam, adaptive step sizes -- the external baseline for our ES, evaluated by the same batched
forward). Every method gets the same budget of **sample-forward evaluations** (one candidate
evaluated on one training image = 1; RSO spends 3 per weight and image of its minibatch, SA and
ticket 2, a population method P per image of a generation's minibatch), the same minibatch size and
the same training images; per-weight methods run whole cycles, so their budgets are rounded to a
cycle (the JSON reports the evaluations each one spent).

The model (``bench_conv``): avg-pool 2 (28 -> 14), conv 1->8 3x3 + BN + ReLU, avg-pool 2, conv
8->16 3x3 + BN + ReLU, global average pool, linear 16->10 -- 1,384 conv/linear weights and 48 BN
parameters, every layer kind of the paper's MNIST net. Why not paper_mnist itself: at 11.8k weights
and about 3 MFLOP per image one RSO cycle at B=100 costs ~3.5M sample-forwards, and a meaningful
comparison (several cycles for the per-weight methods, hundreds of generations for the population
methods) would take hours on 2 CPU cores; this net is ~40x cheaper per image and 8x smaller, so
every method gets several cycles / hundreds of generations in about a minute.

Test accuracy on the full 10k MNIST test set after recomputing BatchNorm statistics on 2000
training images, at several points of each run; wall time and process CPU time exclude those
evaluations (on a shared machine the CPU time is the steadier of the two). Results:
benchmarks/results/compare_methods_cpu.json and .png; the last line is ``RESULT key=value ...``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import default_data_root, git_commit  # noqa: E402

from rso_ext import RSO, data, metrics, models  # noqa: E402
from rso_ext.methods import (DFO, BatchedLoss, EvolutionStrategy,  # noqa: E402
                             GeneticAlgorithm, SimulatedAnnealing, TicketFinder)
from rso_ext.methods.base import draw_batch, spread_indices  # noqa: E402
from rso_ext import batchnorm  # noqa: E402
from rso_ext.visit import MIXING, NORM, execution_order  # noqa: E402

METHODS = ("rso", "sa", "ticket", "es", "ga", "dfo", "evotorch")


def bench_conv(generator: torch.Generator) -> nn.Sequential:
    net = nn.Sequential(OrderedDict([
        ("pool0", nn.AvgPool2d(2)),
        ("conv1", nn.Conv2d(1, 8, 3, padding=1, bias=False)), ("bn1", nn.BatchNorm2d(8)),
        ("relu1", nn.ReLU()), ("pool1", nn.AvgPool2d(2)),
        ("conv2", nn.Conv2d(8, 16, 3, padding=1, bias=False)), ("bn2", nn.BatchNorm2d(16)),
        ("relu2", nn.ReLU()), ("gap", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
        ("fc", nn.Linear(16, 10, bias=False)),
    ]))
    return models.he_init_(net, generator)


def counts(net: nn.Module) -> tuple[int, int]:
    mix = sum(m.weight.numel() for m in net.modules() if isinstance(m, MIXING))
    bn = sum(p.numel() for m in net.modules() if isinstance(m, NORM) for p in m.parameters())
    return mix, bn


class Recorder:
    """Test accuracy at checkpoints; the clock stops while evaluating."""

    def __init__(self, name, splits):
        self.name, self.splits = name, splits
        self.points = []
        self.elapsed = self.cpu = 0.0
        self.t0 = self.c0 = None

    def start(self):
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def record(self, search, evaluations):
        self.elapsed += time.perf_counter() - self.t0
        self.cpu += time.process_time() - self.c0
        search.calibrate(self.splits.train_x)
        acc = metrics.evaluate(search.model, self.splits.test_x, self.splits.test_y)["acc"]
        self.points.append(dict(evaluations=int(evaluations), seconds=self.elapsed,
                                cpu_seconds=self.cpu, test_acc=acc))
        print(f"  {self.name:8s} evals={evaluations:>10,d} t={self.elapsed:6.1f}s "
              f"cpu={self.cpu:6.1f}s test_acc={acc:.4f}", flush=True)
        self.start()


def run_per_weight(name, search, splits, rec, k):
    n_eval = 0
    rec.start()
    for st in search.run(splits.train_x, splits.train_y):
        n_eval += st.weights * k * search.hparams["batch_size"]
        if st.cycle_done:
            rec.record(search, n_eval)
    return n_eval


def run_population(search, splits, rec):
    rec.start()
    last = 0
    for st in search.run(splits.train_x, splits.train_y):
        last = st.evaluations
        if st.cycle_done:
            rec.record(search, st.evaluations)
    return last


class _EvoTorchRun:
    """EvoTorch's PGPE on the same flat parameter vector, minibatches and batched loss."""

    def __init__(self, model, x, y, *, generations, points, batch_size, population, sigma, lr,
                 seed, calib_size=2000):
        from evotorch import Problem
        from evotorch.algorithms import PGPE
        self.model, self.x, self.y = model, x, y
        self.names = [n for n, _ in model.named_parameters()]
        order = [m for _, m in execution_order(model, x[:2])]
        self.loss = BatchedLoss(model, self.names, order)
        self.generator = torch.Generator().manual_seed(seed)
        self.batch_size, self.population = batch_size, population
        self.generations, self.points = generations, points
        self.calib_idx = spread_indices(len(x), calib_size)
        theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

        def fitness(thetas: torch.Tensor) -> torch.Tensor:
            idx = draw_batch(self.generator, len(self.x), self.batch_size)
            return (self.loss(thetas.to(theta0.dtype), self.x[idx], self.y[idx])
                    / self.batch_size).to(thetas.dtype)

        self.problem = Problem("min", fitness, solution_length=len(theta0),
                               initial_bounds=(-1.0, 1.0), vectorized=True, device="cpu",
                               dtype=torch.float32, seed=seed)
        self.searcher = PGPE(self.problem, popsize=population, center_learning_rate=lr,
                             stdev_learning_rate=0.1, stdev_init=sigma, optimizer="adam",
                             ranking_method="centered", center_init=theta0, symmetric=True)

    @torch.no_grad()
    def write(self):
        center = self.searcher.status["center"]
        center = torch.Tensor(center).clone() if torch.is_tensor(center) else \
            torch.as_tensor(center)
        torch.nn.utils.vector_to_parameters(center.float(), self.model.parameters())

    def calibrate(self, x):
        self.write()
        return batchnorm.calibrate(self.model, x[self.calib_idx])

    def run(self, rec):
        rec.start()
        per = self.generations // self.points
        done = 0
        for p in range(self.points):
            n = per if p < self.points - 1 else self.generations - done
            self.searcher.run(n)
            done += n
            rec.record(self, done * self.population * self.batch_size)
        return done * self.population * self.batch_size


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in results.items():
        pts = r["curve"]
        a1.plot([p["evaluations"] / 1e6 for p in pts], [100 * p["test_acc"] for p in pts],
                marker="o", label=name)
        a2.plot([p["seconds"] for p in pts], [100 * p["test_acc"] for p in pts], marker="o",
                label=name)
    a1.set(xlabel="sample-forward evaluations (millions)", ylabel="test accuracy (%)",
           title="accuracy vs evaluations")
    a2.set(xlabel="wall time (s, 2-core CPU)", ylabel="test accuracy (%)",
           title="accuracy vs time")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", default=default_data_root(),
                    help="the full MNIST (default: $RSO_EXT_MNIST_ROOT)")
    ap.add_argument("--quick", action="store_true", help="a fifth of the budget, 5k images")
    ap.add_argument("--rso-cycles", type=int, default=None,
                    help="the budget, as RSO cycles (default 3; 1 with --quick)")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--train-size", type=int, default=None,
                    help="training images (default 10000; 5000 with --quick)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/compare_methods_cpu.json"))
    ap.add_argument("--png", default=None, help="default: the JSON path with .png")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging
    logging.getLogger("evotorch").setLevel(logging.WARNING)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown methods {bad}; choose from {METHODS}")

    rso_cycles = args.rso_cycles or (1 if args.quick else 3)
    train_size = args.train_size or (5000 if args.quick else 10000)
    B = args.batch_size
    splits = data.load_splits("mnist", root=args.data_root, val_size=0)
    splits.train_x, splits.train_y = splits.train_x[:train_size], splits.train_y[:train_size]
    W_mix, W_bn = counts(bench_conv(torch.Generator().manual_seed(0)))
    budget = rso_cycles * (W_mix + W_bn) * 3 * B
    points = 4 if args.quick else 6
    pop = 40
    gens = lambda p: max(points, round(budget / (p * B)))  # noqa: E731
    print(f"bench_conv: {W_mix} weights + {W_bn} BN; {train_size} training images; B={B}; "
          f"budget {budget:,} sample-forward evaluations", flush=True)

    def model():
        return bench_conv(torch.Generator().manual_seed(args.seed))

    def g():
        return torch.Generator().manual_seed(args.seed + 1)

    results = {}
    for name in methods:
        rec = Recorder(name, splits)
        net = model()
        if name == "rso":
            s = RSO(net, cycles=rso_cycles, batch_size=B, generator=g(), backend="torch")
            hp = dict(cycles=rso_cycles)
            ev = run_per_weight(name, s, splits, rec, 3)
        elif name == "sa":
            c = max(1, round(budget / ((W_mix + W_bn) * 2 * B)))
            s = SimulatedAnnealing(net, cycles=c, batch_size=B, t0=1e-3, t_final=1e-5,
                                   generator=g())
            hp = dict(cycles=c, t0=1e-3, t_final=1e-5)
            ev = run_per_weight(name, s, splits, rec, 2)
        elif name == "ticket":
            c = max(1, round(budget / (W_mix * 2 * B)))
            s = TicketFinder(net, cycles=c, batch_size=B, sparsity=0.5, generator=g())
            hp = dict(cycles=c, sparsity=0.5, schedule="constant", init="model")
            ev = run_per_weight(name, s, splits, rec, 2)
        elif name == "es":
            G = gens(pop)
            hp = dict(population=pop, generations=G, sigma=0.03, lr=0.02, optimizer="adam")
            s = EvolutionStrategy(net, cycles=points, generations=G // points, batch_size=B,
                                  population=pop, sigma=0.03, lr=0.02, generator=g())
            ev = run_population(s, splits, rec)
        elif name == "ga":
            G = gens(pop)
            hp = dict(population=pop, generations=G, sigma=0.02, elite=1, parents=8)
            s = GeneticAlgorithm(net, cycles=points, generations=G // points, batch_size=B,
                                 population=pop, elite=1, parents=8, sigma=0.02, generator=g())
            ev = run_population(s, splits, rec)
        elif name == "dfo":
            try:
                import nevergrad  # noqa: F401
            except ImportError:
                print("  dfo: nevergrad is not installed, skipped", flush=True)
                continue
            P = 20
            G = gens(P)
            hp = dict(population=P, generations=G, sigma=0.1, optimizer="DiagonalCMA",
                      params="bn+last")
            s = DFO(net, cycles=points, generations=G // points, batch_size=B, population=P,
                    sigma=0.1, optimizer="DiagonalCMA", params="bn+last", generator=g())
            ev = run_population(s, splits, rec)
        else:
            try:
                import evotorch  # noqa: F401
            except ImportError:
                print("  evotorch: not installed, skipped", flush=True)
                continue
            G = gens(pop)
            hp = dict(algorithm="PGPE", population=pop, generations=G, stdev_init=0.03,
                      center_lr=0.02, stdev_lr=0.1, optimizer="adam")
            r = _EvoTorchRun(net, splits.train_x, splits.train_y, generations=G, points=points,
                             batch_size=B, population=pop, sigma=0.03, lr=0.02,
                             seed=args.seed + 1)
            ev = r.run(rec)
        last = rec.points[-1]
        results[name] = dict(test_acc=last["test_acc"], seconds=last["seconds"],
                             cpu_seconds=last["cpu_seconds"], evaluations=ev, hparams=hp,
                             curve=rec.points)

    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:]))
    pairs = OrderedDict(model="bench_conv", device="cpu", threads=args.threads, batch=B,
                        train_size=train_size, budget=budget)
    for name, r in results.items():
        pairs[f"test_acc_{name}"] = round(r["test_acc"], 4)
        pairs[f"seconds_{name}"] = round(r["seconds"], 1)
        pairs[f"cpu_seconds_{name}"] = round(r["cpu_seconds"], 1)
    out = dict(device=f"cpu ({platform.processor() or platform.machine()}, "
                      f"{args.threads} threads)",
               torch=torch.__version__, commit=git_commit(), command=command,
               model="bench_conv", weights=W_mix, bn_params=W_bn, batch_size=B,
               train_size=train_size, test_size=len(splits.test_x), budget=budget,
               quick=args.quick, methods=results, result=dict(pairs))
    jpath = Path(args.json)
    jpath.parent.mkdir(parents=True, exist_ok=True)
    jpath.write_text(json.dumps(out, indent=2))
    png = plot(results, args.png or jpath.with_suffix(".png"))
    print("\n| method | test acc | wall s | CPU s | evaluations |\n"
          "| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {100 * r['test_acc']:.2f} % | {r['seconds']:.1f} | "
              f"{r['cpu_seconds']:.1f} | {r['evaluations']:,} |")
    print(f"wrote {jpath}" + (f" and {png}" if png else ""))
    print("RESULT " + " ".join(f"{k}={v}" for k, v in pairs.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
