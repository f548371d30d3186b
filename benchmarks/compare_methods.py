#!/usr/bin/env python
"""Every training method of rso_ext against gradient descent at an equal budget of CPU time.

    python benchmarks/compare_methods.py --task paper_mnist --data-root MNIST_DIR --budget 1800
    python benchmarks/compare_methods.py --task blog --data-root MNIST_DIR --budget 1800

Methods: rso, sa, ticket (per-weight, ``rso_ext.methods``, fused backend where the model
lowers), es, ga (population searches, batched with torch.func.vmap), dfo (nevergrad, when
installed), evotorch (EvoTorch's PGPE, when installed) and **sgd**: the reference, the PyTorch
MNIST example's optimiser (Adadelta, StepLR gamma 0.7 per epoch, batch 64).

Tasks: ``paper_mnist`` (the paper's MNIST net, 11.8k weights) and ``blog`` (the PyTorch MNIST
example's net, 1.2 M weights: ``rso_ext.models.pytorch_example``, the blog's ``Net`` as an
``nn.Sequential``), on the full MNIST: 55,000 training images, 5,000 validation, 10,000 test.

**The budget** is process CPU time (all threads of this process; it does not count time spent
waiting for another process, unlike wall time), the same for every method, ``--budget`` seconds
per final run. A method runs in its own steps (a unit sweep, a generation, 50 SGD minibatches)
until the budget is spent. A per-weight unit sweep stops where the budget ends, inside the unit
(``run(stop=)``, polled every 64 weights or every call of the fused op: a unit of the blog's
network, fc1, is 1.2 M weights); a generation or an SGD step may overrun it by that step (the
JSON gives each run's seconds). The
test set is read at ``--points`` points of each final run, off the clock. Per-weight methods anneal
over ``cycles``, which must be fixed in advance: it is the number of cycles that fit the budget,
from the cycle cost their first trial measured (extrapolated from the weights it visited when a
trial ends inside its first cycle).

**Hyperparameters** come from a small grid per method (``GRIDS``, ``--trials`` entries each,
the same number for every method), each tried for ``--trial-fraction`` of the budget and ranked
by **validation** accuracy; the winner gets the full budget. Nothing is selected on the test set.

**Resume**: every finished run (trial or final) is kept in ``<out>/runs.json`` at once, with the
commit and the CPU it ran on; a rerun of the same command skips what is there (a run killed
midway restarts from its beginning). The settings the runs were made under are kept in
``<out>/settings.json``; a rerun under other settings (budget, trials, sizes, seed, threads) is
refused, naming them.

Output: ``<out>/compare_methods_<task>_cpu.json`` (``test_acc_<method>``, ``seconds_<method>``,
``cpu_seconds_<method>`` for every method that ran, the budget and the machine), a PNG of test
accuracy against CPU and wall time, and a final ``RESULT key=value ...`` line.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import command_line, default_data_root, device_name, git_commit, pyplot  # noqa: E402

from rso_ext import data, metrics, models, runtime  # noqa: E402
from rso_ext.methods import METHODS as SEARCHES  # noqa: E402

METHODS = ("rso", "sa", "ticket", "es", "ga", "dfo", "evotorch", "sgd")
PER_WEIGHT = ("rso", "sa", "ticket")
TASKS = {"paper_mnist": models.paper_mnist, "blog": models.pytorch_example}

#: the hyperparameter grid of each method; trials take the first ``--trials`` entries
GRIDS: dict[str, list[dict[str, Any]]] = {
    "rso": [dict(batch_size=b) for b in (1000, 250, 4000)],
    "sa": [dict(batch_size=1000, t0=t) for t in (1e-3, 1e-4, 1e-2)],
    "ticket": [dict(batch_size=1000, sparsity=s) for s in (0.5, 0.3, 0.7)],
    "es": [dict(batch_size=256, population=40, sigma=s, lr=lr)
           for s, lr in ((0.02, 0.01), (0.05, 0.03), (0.01, 0.003))],
    "ga": [dict(batch_size=256, population=40, sigma=s, elite=1, parents=8)
           for s in (0.02, 0.05, 0.005)],
    "dfo": [dict(batch_size=256, population=20, sigma=s, optimizer="DiagonalCMA",
                 params="bn+last") for s in (0.1, 0.3, 0.03)],
    "evotorch": [dict(batch_size=256, population=40, stdev_init=s, center_lr=lr)
                 for s, lr in ((0.02, 0.01), (0.05, 0.03), (0.01, 0.003))],
    "sgd": [dict(batch_size=64, lr=lr, gamma=0.7) for lr in (1.0, 0.3, 3.0)],
}
SGD_CHUNK = 50            # minibatches per SGD step of the budget loop


# -- one method as a sequence of bounded steps ---------------------------------------------------
class Runner:
    """``advance()`` does one bounded step (False when the method is done); ``model`` is what is
    evaluated after ``prepare_eval(x)``. A step may stop early at ``deadline`` (process CPU time)
    where the method can (the per-weight sweeps)."""

    model: torch.nn.Module
    deadline: float = math.inf

    def advance(self) -> bool:
        raise NotImplementedError

    def prepare_eval(self, x: torch.Tensor) -> None:
        self.model.eval()


class SearchRunner(Runner):
    """A class form of ``rso_ext.methods``: one step = one unit sweep (ended early at
    ``deadline``) or one generation."""

    def __init__(self, search, x, y):
        self.search, self.model = search, search.model
        self.search.check(x, y)
        self.deadline = math.inf          # process CPU time at which a sweep stops (run_budget)
        self.it = search.run(x, y, stop=lambda: time.process_time() >= self.deadline)
        self.visited = 0          # weights (per-weight) visited so far
        self.cycle_done_at: list[int] = []

    def advance(self) -> bool:
        st = next(self.it, None)
        if st is None:
            return False
        if getattr(st, "weights", None):
            self.visited += st.weights
        if st.cycle_done:
            self.cycle_done_at.append(self.visited)
        return True

    def prepare_eval(self, x):
        self.search.calibrate(x)


class SGDRunner(Runner):
    """The PyTorch MNIST example's training: Adadelta, NLL of log-softmax (= cross-entropy),
    StepLR(step_size=1, gamma) per epoch, shuffled minibatches; one step = SGD_CHUNK minibatches."""

    def __init__(self, model, x, y, *, batch_size, lr, gamma, seed):
        self.model, self.x, self.y, self.B = model, x, y, batch_size
        self.opt = torch.optim.Adadelta(model.parameters(), lr=lr)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=1, gamma=gamma)
        self.g = torch.Generator().manual_seed(seed)
        self.perm, self.pos = torch.randperm(len(x), generator=self.g), 0

    def advance(self) -> bool:
        self.model.train()
        for _ in range(SGD_CHUNK):
            if self.pos >= len(self.x):                    # epoch done
                self.sched.step()
                self.perm, self.pos = torch.randperm(len(self.x), generator=self.g), 0
            idx = self.perm[self.pos:self.pos + self.B]
            self.pos += self.B
            self.opt.zero_grad()
            F.cross_entropy(self.model(self.x[idx]), self.y[idx]).backward()
            self.opt.step()
        return True


class EvoTorchRunner(Runner):
    """EvoTorch's PGPE (symmetric sampling, centred ranks, Adam) on the flat parameter vector,
    the minibatch loss from rso_ext's batched evaluation; one step = one generation."""

    def __init__(self, model, x, y, *, batch_size, population, stdev_init, center_lr, seed):
        from evotorch import Problem
        from evotorch.algorithms import PGPE

        from rso_ext.methods import BatchedLoss
        from rso_ext.methods.base import draw_batch
        from rso_ext.visit import execution_order
        self.model = model
        names = [n for n, _ in model.named_parameters()]
        loss = BatchedLoss(model, names, [m for _, m in execution_order(model, x[:2])])
        g = torch.Generator().manual_seed(seed)
        theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

        def fitness(thetas: torch.Tensor) -> torch.Tensor:
            idx = draw_batch(g, len(x), batch_size)
            return (loss(thetas.to(theta0.dtype), x[idx], y[idx]) / batch_size).to(thetas.dtype)

        problem = Problem("min", fitness, solution_length=len(theta0), initial_bounds=(-1, 1),
                          vectorized=True, device="cpu", dtype=torch.float32, seed=seed)
        self.searcher = PGPE(problem, popsize=population, center_learning_rate=center_lr,
                             stdev_learning_rate=0.1, stdev_init=stdev_init, optimizer="adam",
                             ranking_method="centered", center_init=theta0, symmetric=True)

    def advance(self) -> bool:
        self.searcher.step()
        return True

    def prepare_eval(self, x):
        center = torch.as_tensor(self.searcher.status["center"]).clone().float()
        torch.nn.utils.vector_to_parameters(center, self.model.parameters())
        from rso_ext import batchnorm
        batchnorm.calibrate(self.model, x[:2000])


def available(method: str) -> str | None:
    """None, or why the method cannot run here."""
    mod = {"dfo": "nevergrad", "evotorch": "evotorch"}.get(method)
    if mod is None:
        return None
    try:
        __import__(mod)
    except ImportError:
        return f"{mod} is not installed"
    return None


def build(method: str, hp: dict, task: str, x, y, seed: int, cycles: int) -> Runner:
    model = TASKS[task](torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    hp = dict(hp, batch_size=min(hp["batch_size"], len(x)))     # tiny training sets (tests)
    if method == "sgd":
        return SGDRunner(model, x, y, seed=seed + 1, **hp)
    if method == "evotorch":
        return EvoTorchRunner(model, x, y, seed=seed + 1, **hp)
    cls = SEARCHES[method]
    if method in PER_WEIGHT:
        return SearchRunner(cls(model, cycles=cycles, generator=gen, **hp), x, y)
    # population methods: no schedule to fit; generations run until the budget ends
    return SearchRunner(cls(model, cycles=1, generations=10**7, generator=gen, **hp), x, y)


# -- a run under a budget -------------------------------------------------------------------------
def run(runner: Runner, budget: float, points: int, evaluate: Callable[[Runner], dict],
        label: str) -> dict:
    """Steps until ``budget`` CPU seconds are spent (or the method ends); ``evaluate`` at
    ``points`` evenly spaced CPU times, off the clock."""
    cpu = wall = 0.0
    curve = []
    marks = [budget * (i + 1) / points for i in range(points)]
    done = False
    while not done and cpu < budget:
        c0, w0 = time.process_time(), time.perf_counter()
        runner.deadline = c0 + budget - cpu     # a per-weight sweep stops there, mid-unit
        done = not runner.advance()
        cpu += time.process_time() - c0
        wall += time.perf_counter() - w0
        if marks and (cpu >= marks[0] or done or cpu >= budget):
            while marks and cpu >= marks[0]:
                marks.pop(0)
            point = dict(cpu_seconds=cpu, seconds=wall, **evaluate(runner))
            curve.append(point)
            print(f"  {label}: cpu {cpu:7.1f} s, wall {wall:7.1f} s, "
                  + " ".join(f"{k} {v:.4f}" for k, v in point.items() if k.endswith("acc")),
                  flush=True)
    if not curve or curve[-1]["cpu_seconds"] != cpu:
        curve.append(dict(cpu_seconds=cpu, seconds=wall, **evaluate(runner)))
    return dict(cpu_seconds=cpu, seconds=wall, curve=curve, finished=done)


def release(runner: Runner) -> None:
    """Frees a finished run's caches before the next run is built. A per-weight run stopped
    inside a unit leaves its sweep generator suspended, holding the unit's cached activations
    of the whole pool (GiBs on the full MNIST); its stop hook refers back to the runner, and
    that reference cycle lives until the cycle collector runs, which large tensors do not
    trigger: without this, one process kept every earlier run's caches (15.7 GB by the final
    run of a method on the full MNIST)."""
    it = getattr(runner, "it", None)
    if it is not None:
        it.close()
    runner.__dict__.clear()
    gc.collect()


def cycle_cost(runner: Runner, cpu: float, total_weights: int) -> float:
    """CPU seconds of one cycle of a per-weight run: measured when its first cycle ended within
    the run, else extrapolated from the weights it visited."""
    if runner.cycle_done_at:
        return cpu * runner.cycle_done_at[0] / max(runner.visited, 1)
    return cpu * total_weights / max(runner.visited, 1)


# -- main -------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(TASKS), default="paper_mnist")
    ap.add_argument("--data-root", default=default_data_root(),
                    help="the full MNIST (default: $RSO_EXT_MNIST_ROOT, else the embedded subset; "
                         "'embedded' forces the subset)")
    ap.add_argument("--budget", type=float, default=1800.0,
                    help="CPU seconds of each final run (default 1800)")
    ap.add_argument("--trials", type=int, default=3, help="grid entries tried per method")
    ap.add_argument("--trial-fraction", type=float, default=0.2,
                    help="a trial's budget, as a fraction of --budget")
    ap.add_argument("--points", type=int, default=6, help="test evaluations per final run")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--train-size", type=int, default=None, help="first N training images")
    ap.add_argument("--val-size", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    ap.add_argument("--out", default=None,
                    help="results folder (default benchmarks/results/compare_methods_<task>_cpu)")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
    if not 1 <= args.trials <= min(len(g) for g in GRIDS.values()):
        ap.error(f"--trials must be in [1, {min(len(g) for g in GRIDS.values())}]")
    if args.budget <= 0 or not 0 < args.trial_fraction <= 1 or args.points < 1:
        ap.error("--budget > 0, 0 < --trial-fraction <= 1 and --points >= 1 are needed")
    if args.threads:
        torch.set_num_threads(args.threads)
    runtime.reuse_freed_memory()
    warnings.filterwarnings("ignore")
    logging.getLogger("evotorch").setLevel(logging.WARNING)

    out = Path(args.out or ROOT / "benchmarks" / "results" / f"compare_methods_{args.task}_cpu")
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "runs.json"
    runs: dict[str, dict] = json.loads(runs_path.read_text()) if runs_path.exists() else {}
    # the runs kept in a folder are comparable only under the same settings: refuse a resume
    # under others (--methods may grow; the data folder may sit elsewhere on another machine)
    settings = {k: getattr(args, k) for k in ("task", "budget", "trials", "trial_fraction",
                                              "points", "train_size", "val_size", "seed",
                                              "threads")}
    settings_path = out / "settings.json"
    if settings_path.exists():
        kept = json.loads(settings_path.read_text())
        diff = {k: (kept.get(k), v) for k, v in settings.items() if kept.get(k) != v}
        if diff:
            ap.error(f"{out} holds runs made under other settings; use another --out or the "
                     "same " + ", ".join(f"--{k.replace('_', '-')} (kept {a}, given {b})"
                                         for k, (a, b) in diff.items()))
    else:
        settings_path.write_text(json.dumps(settings, indent=1))

    # each run records the code and the CPU it ran on: a comparison spans sessions and machines
    code, cpu_name = git_commit(), device_name("cpu")

    def keep(key: str, rec: dict) -> None:
        runs[key] = dict(rec, commit=code, device=cpu_name)
        tmp = runs_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(runs, indent=1))
        os.replace(tmp, runs_path)

    if args.data_root == "embedded":
        args.data_root = None
    splits = data.load_splits("mnist", root=args.data_root, val_size=args.val_size,
                              seed=args.seed)
    x, y = splits.train_x[:args.train_size], splits.train_y[:args.train_size]
    total_weights = sum(p.numel() for p in TASKS[args.task]().parameters())
    print(f"compare_methods: {args.task} ({total_weights:,} parameters), {len(x)} train / "
          f"{len(splits.val_x)} val / {len(splits.test_x)} test, budget {args.budget:.0f} CPU-s "
          f"per method, {args.trials} trials of {args.trial_fraction:.0%}, "
          f"{torch.get_num_threads()} thread(s)", flush=True)

    def on(split_x, split_y, name):
        def ev(r: Runner) -> dict:
            r.prepare_eval(x)
            return {f"{name}_acc": metrics.evaluate(r.model, split_x, split_y)["acc"]}
        return ev

    val_eval = on(splits.val_x, splits.val_y, "val")

    def test_and_val(r: Runner) -> dict:
        out_ = val_eval(r)
        out_.update(test_acc=metrics.evaluate(r.model, splits.test_x, splits.test_y)["acc"])
        return out_

    trial_budget = args.budget * args.trial_fraction
    summary: dict[str, dict] = {}
    for m in methods:
        why = available(m)
        if why:
            print(f"{m}: skipped ({why})", flush=True)
            continue
        # trials on the validation split
        for t, hp in enumerate(GRIDS[m][:args.trials]):
            key = f"{m}/trial{t}"
            if key in runs:
                continue
            cycles = 1
            r = build(m, hp, args.task, x, y, args.seed, cycles)
            rec = run(r, trial_budget, 1, val_eval, f"{m} trial {t} {hp}")
            rec.update(hparams=hp, val_acc=rec["curve"][-1]["val_acc"])
            if m in PER_WEIGHT:
                rec["cycle_cpu_seconds"] = cycle_cost(r, rec["cpu_seconds"], total_weights)
            keep(key, rec)
            release(r)
        trials = [runs[f"{m}/trial{t}"] for t in range(args.trials)]
        best = max(range(args.trials), key=lambda t: trials[t]["val_acc"])
        hp = trials[best]["hparams"]
        key = f"{m}/final"
        if key not in runs:
            cycles = 1
            if m in PER_WEIGHT:
                cycles = max(1, math.floor(args.budget / trials[best]["cycle_cpu_seconds"]))
            r = build(m, hp, args.task, x, y, args.seed, cycles)
            rec = run(r, args.budget, args.points, test_and_val, f"{m} final {hp}")
            rec.update(hparams=hp, cycles=cycles if m in PER_WEIGHT else None,
                       chosen_trial=best)
            keep(key, rec)
            release(r)
        fin = runs[key]
        summary[m] = dict(test_acc=fin["curve"][-1]["test_acc"],
                          val_acc=fin["curve"][-1]["val_acc"], seconds=fin["seconds"],
                          cpu_seconds=fin["cpu_seconds"], hparams=fin["hparams"],
                          cycles=fin.get("cycles"), commit=fin.get("commit"),
                          device=fin.get("device"),
                          trials=[dict(hparams=tr["hparams"], val_acc=tr["val_acc"])
                                  for tr in trials])

    result: dict[str, Any] = dict(task=args.task, budget_cpu_seconds=args.budget,
                                  threads=torch.get_num_threads())
    for m, s in summary.items():
        result[f"test_acc_{m}"] = s["test_acc"]
        result[f"seconds_{m}"] = s["seconds"]
        result[f"cpu_seconds_{m}"] = s["cpu_seconds"]
    # the CPUs the final runs ran on (runs.json names each run's), not only this process's
    devices = sorted({s["device"] for s in summary.values() if s.get("device")})
    doc = dict(benchmark="compare_methods", device=", ".join(devices) or device_name("cpu"),
               torch=torch.__version__,
               commit=git_commit(),
               command=command_line(argv),
               task=args.task, parameters=total_weights, train_size=len(x),
               val_size=len(splits.val_x), test_size=len(splits.test_x),
               data=args.data_root or "embedded subset", budget_cpu_seconds=args.budget,
               trials=args.trials, trial_fraction=args.trial_fraction,
               grids={m: GRIDS[m][:args.trials] for m in summary},
               methods=summary, curves={m: runs[f"{m}/final"]["curve"] for m in summary},
               result=result)
    jpath = out / f"compare_methods_{args.task}_cpu.json"
    jpath.write_text(json.dumps(doc, indent=1) + "\n")
    png = plot(doc, jpath.with_suffix(".png"))
    print("\n| method | hyperparameters (chosen on validation) | test acc | CPU s | wall s |\n"
          "| --- | --- | --- | --- | --- |")
    for m, s in summary.items():
        print(f"| {m} | {s['hparams']} | {100 * s['test_acc']:.2f} % | {s['cpu_seconds']:.0f} "
              f"| {s['seconds']:.0f} |")
    print(f"wrote {jpath}" + (f" and {png.name}" if png else ""), flush=True)
    print("RESULT " + " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in result.items()), flush=True)
    return 0


def plot(doc: dict, path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "cpu_seconds", "process CPU seconds"),
                           (axes[1], "seconds", "wall seconds")):
        for m, pts in doc["curves"].items():
            ax.plot([p[key] for p in pts], [100 * p["test_acc"] for p in pts], marker="o",
                    label=m)
        ax.set(xlabel=label, ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{doc['task']}: every method at {doc['budget_cpu_seconds']:.0f} CPU-s "
                 f"({doc['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
