#!/usr/bin/env python
"""Weight proposals per second, per unit and for one whole cycle, of every candidate-evaluation
backend on the same device, data, starting weights and random streams (docs/design.md §5).

Backends (all in this process):

* ``torch-naive``   TorchSweeper + FullForward: three whole forward passes per weight;
* ``torch-cached``  TorchSweeper + CachedInput: the authors' method, cached input of the swept
  layer and three partial forwards;
* ``torch-batched`` TorchSweeper + BatchedCandidates: cached input, the three candidates stacked
  into one 3B forward;
* ``fused``         ``RSO(..., backend="fused").sweeper(unit)``, whenever ``"fused"`` is in
  ``rso_ext.rso.BACKENDS``.

Every backend gets its own model, re-created from the same seed, and its own ``RSO`` built with the
same seed, and makes the same sequence of ``RSO.sweep_unit`` calls, so all of them draw identical
streams; units are visited in the driver's order (last layer first), all backends unit by unit.

Per unit sweep the time splits into *setup* (drawing the streams, BatchNorm calibration, building
the sweeper and its caches in ``begin``, ``end``) and the *weight loop*. The first visited weight
of each unit is a warm-up: the rate of the unit is (weights - 1) / time of the other weights.

The fused sweep keeps a channel it recomputes per minibatch (large pools) exact at the end
of each call, as the driver's calls end with a neuron; its timed calls end on neuron
boundaries too.

``--quick`` measures the first weights of each unit: every backend sweeps at least
``--min-weights`` of them (the *kept* weights, identical on every backend), then goes on sweeping
until its share of the time budget for this unit is spent (in one call, as the driver makes, where
the whole unit at the warm-up weight's pace fits in half that share; else in calls that end on
neuron boundaries and grow towards the cap); the weights swept beyond the kept ones
are timed, compared, then restored, so every backend enters the next unit with the same weights.
To spend the budget on weights rather than set-up, it searches on a subset of the training set
(``max(2048, 2B)`` images) and calibrates BatchNorm on 512 images, and extrapolates the cycle:
``cycle_s = sum over units of (n_weights / rate + setup)``, where the ``begin`` part of the setup
is scaled linearly to the full pool and the rest (calibration, streams) to 2000 calibration images.
Without ``--quick`` every backend sweeps a whole cycle and the cycle time is measured.

Output: a table per unit, the cycle line, decision agreement against torch-cached (fraction of the
measured weights whose final value is the same), the JSON file
``benchmarks/results/bench_perturb_<model>_B<B>_<device>[_quick].json`` and a final ``RESULT`` line.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import default_data_root, device_name, git_commit  # noqa: E402

import rso_ext  # noqa: E402
from rso_ext import RSO, models, runtime  # noqa: E402
from rso_ext import rso as rso_module  # noqa: E402
from rso_ext.data import load_splits  # noqa: E402
from rso_ext.evaluate import BatchedCandidates, CachedInput, FullForward  # noqa: E402
from rso_ext.sweep import TorchSweeper  # noqa: E402

TORCH_EVALUATORS = {
    "torch-naive": FullForward,
    "torch-cached": CachedInput,
    "torch-batched": BatchedCandidates,
}
ALL_BACKENDS = tuple(TORCH_EVALUATORS) + ("fused",)
REFERENCE = "torch-cached"          # ratios and decision agreement are taken against it
CALIB = 2000                        # the driver's default calibration set


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- timing -----------------------------------------------------------------------------------------
class TimedSweeper:
    """Wraps a sweeper: times ``begin``, the warm-up weight, the other weights and ``end``; with
    ``cap_s`` it stops the weight loop once ``cap_s`` seconds have gone into weights after the
    warm-up (and at least ``min_weights`` weights were visited), recording how many it visited;
    :meth:`restore` puts back the weights visited beyond the first ``min_weights``."""

    def __init__(self, inner, unit, device: torch.device, cap_s: float | None = None,
                 min_weights: int = 3, align: int = 1) -> None:
        self.inner, self.unit, self.device = inner, unit, device
        self.cap_s, self.min_weights, self.align = cap_s, min_weights, align
        self.begin_s = self.warm_s = self.run_s = self.end_s = 0.0
        self.visited = 0

    def begin(self, x, y) -> None:
        sync(self.device)
        t = time.perf_counter()
        self.inner.begin(x, y)
        sync(self.device)
        self.begin_s = time.perf_counter() - t

    def run(self, k0, k1, streams, decay, tick=None):
        keep = k1 if self.cap_s is None else min(k1, k0 + self.min_weights)
        self.keep = keep - k0
        self.saved = self.unit.param.detach().reshape(-1)[keep:k1].to("cpu", copy=True)
        t = time.perf_counter()
        accepted, loss = self.inner.run(k0, k0 + 1, streams, decay)
        sync(self.device)
        self.warm_s = time.perf_counter() - t
        t0 = time.perf_counter()
        k = k0 + 1
        # the driver sweeps a unit in one call: so does the benchmark wherever the rest of the
        # unit, at the warm-up weight's pace (an overestimate), fits in half the cap
        whole = self.cap_s is None or self.warm_s * (k1 - k) <= self.cap_s / 2
        if whole:
            if k < k1:
                a, lo = self.inner.run(k, k1, streams, decay)
                accepted, loss, k = accepted + a, loss + lo, k1
        else:
            chunk = max(1, self.min_weights - 1)    # the kept weights in one call
            while k < k1:
                b = min(k1, k + chunk)
                if self.align > 1:    # calls end where neurons end, as the driver's do
                    b = min(k1, k0 + -(-(b - k0) // self.align) * self.align)
                a, lo = self.inner.run(k, b, streams, decay)
                sync(self.device)
                accepted, loss, k = accepted + a, loss + lo, b
                spent = time.perf_counter() - t0
                if k - k0 >= self.min_weights and spent >= self.cap_s:
                    break
                done = k - k0 - 1                  # timed weights so far
                left = max(self.cap_s - spent, 0.0)
                # grow geometrically towards the cap: few calls, little overshoot
                chunk = max(1, min(2 * done, int(left * done / max(spent, 1e-9)) + 1),
                            self.min_weights - (k - k0))
        sync(self.device)
        self.run_s = time.perf_counter() - t0
        self.visited = k - k0
        return accepted, loss

    def end(self) -> None:
        t = time.perf_counter()
        self.inner.end()
        sync(self.device)
        self.end_s = time.perf_counter() - t

    def restore(self) -> None:
        """Undo the sweep of the weights beyond the kept ones (after :meth:`end`)."""
        flat = self.unit.param.data.view(-1)
        extra = self.visited - self.keep
        if extra > 0:
            start = self.keep
            flat[start:start + extra] = self.saved[:extra].to(flat.device)


class Backend:
    """One backend's model, RSO and per-unit measurements."""

    def __init__(self, name: str, args, x: torch.Tensor, device: torch.device) -> None:
        self.name = name
        self.model = models.get_model(args.model, torch.Generator().manual_seed(args.seed))
        self.model.to(device)
        self.rso = RSO(self.model, batch_size=args.batch_size, cycles=args.cycles,
                       generator=torch.Generator().manual_seed(args.seed),
                       calib_size=args.calib_size,
                       pool_size=args.pool_size, backend="fused" if name == "fused" else "torch")
        self.rso.calibrate(x)          # builds rso.units (and, for fused, the plan)
        self.rows: list[dict] = []

    def sweeper(self, index: int):
        unit = self.rso.units[index]
        if self.name == "fused":
            return self.rso.sweeper(unit)
        return TorchSweeper(unit, TORCH_EVALUATORS[self.name](self.model))

    def sweep(self, index, x, y, device, weights, cap_s=None, min_weights=3) -> dict:
        sync(device)
        t = time.perf_counter()
        unit = self.rso.units[index]
        # the fused sweep keeps a lazily recomputed channel exact at the end of every call, as
        # the driver's calls end with a neuron: time it in whole neurons too
        align = unit.param.numel() // unit.param.shape[0] if self.name == "fused" else 1
        timed = TimedSweeper(self.sweeper(index), unit, device, cap_s, min_weights, align)
        build_s = time.perf_counter() - t
        stats = self.rso.sweep_unit(index, x, y, weights=weights, sweeper=timed)
        sync(device)
        total = time.perf_counter() - t
        m = timed.visited
        final = unit.param.detach().reshape(-1)[:m].to("cpu", copy=True)
        timed.restore()
        return dict(total_s=total, build_s=build_s, begin_s=timed.begin_s, warm_s=timed.warm_s,
                    run_s=timed.run_s, end_s=timed.end_s, visited=m,
                    setup_s=total - timed.warm_s - timed.run_s,
                    other_s=total - build_s - timed.begin_s - timed.warm_s - timed.run_s
                    - timed.end_s,
                    rate=(m - 1) / timed.run_s if m > 1 and timed.run_s > 0 else float("nan"),
                    accepted=stats.accepted, final=final)


def profile_units(backends, units, x, y, device, weights: int, path: Path) -> None:
    """Where a backend's time goes: ``weights`` weights of the first, a middle and the last conv
    weight unit under torch.profiler, the top operators by self time (device time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile
    convs = [i for i, u in enumerate(units)
             if isinstance(u.module, torch.nn.Conv2d) and u.param_name == "weight"]
    convs.sort(key=lambda i: units[i].position)
    picks = sorted({convs[0], convs[len(convs) // 2], convs[-1]}) if convs else [0]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    parts = []
    for b in backends:
        for i in picks:
            m = min(weights, units[i].param.numel())
            with profile(activities=acts) as prof:
                r = b.sweep(i, x, y, device, m)      # the model is not measured after this
            parts.append(f"== {b.name} {units[i].name}: {m} weights, {r['total_s']:.3f} s in all "
                         f"(begin {r['begin_s']:.3f} s, weights {r['warm_s'] + r['run_s']:.3f} "
                         f"s), top operators by {key}\n"
                         + prof.key_averages().table(sort_by=key, row_limit=20))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(parts) + "\n")
    print(f"wrote the profile {os.path.relpath(path, Path.cwd())}")


# -- the benchmark ----------------------------------------------------------------------------------
def unit_kind(model: torch.nn.Module, units) -> dict:
    """Indices of the deepest conv weight unit, the final linear weight unit and fc1."""
    convs = [i for i, u in enumerate(units)
             if isinstance(u.module, torch.nn.Conv2d) and u.param_name == "weight"]
    lins = [i for i, u in enumerate(units)
            if isinstance(u.module, torch.nn.Linear) and u.param_name == "weight"]
    out = {}
    if convs:
        out["last_conv"] = max(convs, key=lambda i: units[i].position)
    if lins:
        out["linear"] = max(lins, key=lambda i: units[i].position)
    fc1 = [i for i in lins if units[i].module_name == "fc1"]
    if fc1:
        out["fc1"] = fc1[0]
    return out


def fmt(v: float) -> str:
    if v != v:
        return "nan"
    if v == 0 or 1e-3 <= abs(v) < 1e6:
        return f"{v:.4g}"
    return f"{v:.3e}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["paper_mnist", "pytorch_example"], default="paper_mnist")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: all cores available)")
    p.add_argument("--quick", action="store_true",
                   help="measure a sample of weights per unit and extrapolate the cycle")
    p.add_argument("--budget", type=float, default=75.0,
                   help="--quick: seconds the measurements aim at (default 75)")
    p.add_argument("--min-weights", type=int, default=3,
                   help="--quick: weights per unit kept (swept identically) by every backend, "
                        "incl. the warm-up one (default 3)")
    p.add_argument("--max-weights", type=int, default=None,
                   help="--quick: most weights per unit (default: no limit but the budget)")
    p.add_argument("--train-size", type=int, default=None,
                   help="training images searched on (default: all; --quick: max(2048, 2B))")
    p.add_argument("--calib-size", type=int, default=None,
                   help="BatchNorm calibration images (default 2000; --quick: 512, the time "
                        "extrapolated to 2000)")
    p.add_argument("--pool-size", type=int, default=None,
                   help="RSO pool_size (per-sweep subset of the training set; default: all)")
    p.add_argument("--backends", default=None,
                   help=f"comma list among {','.join(ALL_BACKENDS)} (default: all available)")
    p.add_argument("--data-root", default=default_data_root(),
                   help="MNIST folder (default: $RSO_EXT_MNIST_ROOT if set, else the "
                        "embedded 10k subset; 'embedded' forces the subset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cycles", type=int, default=50, help="RSO cycles (sets the annealing; "
                   "the benchmark sweeps cycle 0)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--profile", default=None, metavar="PATH",
                   help="after the measurements, profile --profile-weights weights of the first "
                        "conv, a middle conv and the last conv unit of each backend with "
                        "torch.profiler and write the top operators by (device) time to PATH")
    p.add_argument("--profile-weights", type=int, default=8,
                   help="--profile: weights swept per profiled unit (default 8)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    malloc_tuned = runtime.reuse_freed_memory()

    fused_available = "fused" in rso_module.BACKENDS
    if args.backends:
        names = [b.strip() for b in args.backends.split(",") if b.strip()]
        bad = [b for b in names if b not in ALL_BACKENDS]
        if bad:
            p.error(f"unknown backends {bad}; choose among {ALL_BACKENDS}")
        if "fused" in names and not fused_available:
            p.error("fused requested but 'fused' is not in rso_ext.rso.BACKENDS")
    else:
        names = [b for b in ALL_BACKENDS if b != "fused" or fused_available]
    names = [b for b in ALL_BACKENDS if b in names]     # canonical order: naive first
    if not fused_available:
        print("NOTE: fused backend is MISSING ('fused' not in rso_ext.rso.BACKENDS): "
              "measuring the torch baselines only, no ratios against fused", flush=True)

    # data
    t_start = time.perf_counter()
    if args.data_root in ("", "embedded"):
        args.data_root = None
    splits = load_splits(root=args.data_root)
    data_desc = ("$RSO_EXT_MNIST_ROOT (the full MNIST)"
                 if args.data_root and args.data_root == default_data_root()
                 else args.data_root or "embedded MNIST subset")
    full_n = len(splits.train_x)
    n = args.train_size or (min(full_n, max(2048, 2 * args.batch_size)) if args.quick else full_n)
    n = min(n, full_n)
    x = splits.train_x[:n].contiguous().to(device)
    y = splits.train_y[:n].contiguous().to(device)
    eff_full = min(full_n, args.pool_size or full_n)
    eff_used = min(n, args.pool_size or n)
    begin_scale = eff_full / eff_used
    if args.calib_size is None:
        args.calib_size = 512 if args.quick else CALIB
    calib_scale = min(CALIB, full_n) / min(args.calib_size, n)

    backends = [Backend(b, args, x, device) for b in names]
    units = backends[0].rso.units
    nweights = [u.param.numel() for u in units]
    kinds = unit_kind(backends[0].model, units)
    print(f"bench_perturb: model={args.model} B={args.batch_size} device={device_name(device)} "
          f"threads={threads} torch={torch.__version__} data={data_desc} "
          f"train={n}/{full_n} quick={args.quick} backends={','.join(names)}", flush=True)

    # measure, unit by unit, every backend on the same unit
    rows = []
    setup_est = {b: 0.0 for b in names}
    t_meas = time.perf_counter()
    for i, unit in enumerate(units):
        row = dict(unit=unit.name, weights=nweights[i], backends={})
        weights = nweights[i]
        if args.quick and args.max_weights:
            weights = min(weights, max(args.max_weights, args.min_weights))
        for j, b in enumerate(backends):
            cap = None
            if args.quick:        # an equal share of what is left of the budget, minus set-up
                left = max(args.budget - (time.perf_counter() - t_meas), 0.0)
                share = left / ((len(units) - i) * len(backends) - j)
                cap = max(share - setup_est[b.name], 0.0)
            r = b.sweep(i, x, y, device, weights, cap, args.min_weights)
            setup_est[b.name] = r["setup_s"] if i == 0 else 0.5 * (setup_est[b.name] + r["setup_s"])
            row["backends"][b.name] = r
        # decisions: the final values of the weights both backends visited, against the reference
        ref = row["backends"].get(REFERENCE) or row["backends"][names[0]]
        for b in names:
            r = row["backends"][b]
            m = min(len(r["final"]), len(ref["final"]))
            same = torch.isclose(r["final"][:m], ref["final"][:m], rtol=1e-6, atol=1e-9)
            r["compared"], r["agreed"] = m, int(same.sum())
            r["agreement"] = float(same.double().mean())
        print(f"  {unit.name:<14} " + "  ".join(
            f"{b}={fmt(row['backends'][b]['rate'])}/s (m={row['backends'][b]['visited']})"
            for b in names), flush=True)
        rows.append(row)
    measure_s = time.perf_counter() - t_meas

    # cycle figures
    cycle, loop = {}, {b: 0.0 for b in names}      # loop: weight loops only, no set-up
    for b in names:
        tot = 0.0
        for i, row in enumerate(rows):
            r = row["backends"][b]
            if args.quick:
                setup = (r["build_s"] + r["begin_s"] * begin_scale + r["other_s"] * calib_scale
                         + r["end_s"])
                tot += nweights[i] / r["rate"] + setup
                loop[b] += nweights[i] / r["rate"]
            else:
                tot += r["total_s"]
                loop[b] += r["warm_s"] + r["run_s"]
        cycle[b] = tot
    total_weights = sum(nweights)
    agreement = {}
    for b in names:
        agreement[b] = (sum(row["backends"][b]["agreed"] for row in rows)
                        / max(1, sum(row["backends"][b]["compared"] for row in rows)))

    # table
    has_fused = "fused" in names
    has_ref = REFERENCE in names
    head = f"{'unit':<14} {'weights':>8} " + " ".join(f"{b + ' w/s (m)':>22}" for b in names)
    if has_fused and has_ref:
        head += f" {'fused/cached':>13}"
    print()
    print(head)
    print("-" * len(head))
    for row in rows:
        line = f"{row['unit']:<14} {row['weights']:>8} " + " ".join(
            f"{fmt(row['backends'][b]['rate']) + ' (' + str(row['backends'][b]['visited']) + ')':>22}"
            for b in names)
        if has_fused and has_ref:
            line += f" {fmt(row['backends']['fused']['rate'] / row['backends'][REFERENCE]['rate']):>13}"
        print(line)
    print("-" * len(head))
    kind = "extrapolated" if args.quick else "measured"
    print(f"{'cycle s (' + kind + ')':<23} " + " ".join(f"{fmt(cycle[b]):>22}" for b in names)
          + (f" {fmt(cycle[REFERENCE] / cycle['fused']):>13}" if has_fused and has_ref else ""))
    print(f"{'cycle weights/s':<23} " + " ".join(f"{fmt(total_weights / cycle[b]):>22}"
                                                   for b in names))
    print(f"{'setup s (measured)':<23} " + " ".join(
        f"{fmt(sum(r['backends'][b]['setup_s'] for r in rows)):>22}" for b in names)
        + ("   (quick: before scaling to the full pool and calibration set)" if args.quick
           else ""))
    print(f"{'weight loops s':<23} " + " ".join(f"{fmt(loop[b]):>22}" for b in names))
    print(f"{'agree w/ ' + (REFERENCE if has_ref else names[0]):<23} " + " ".join(
        f"{fmt(agreement[b]):>22}" for b in names))

    # RESULT
    res = dict(model=args.model, device=device.type, batch=args.batch_size)
    if has_fused:
        for b in ("torch-cached", "torch-naive", "torch-batched"):
            if b in names:
                res[f"ratio_cycle_vs_{b.replace('-', '_')}"] = cycle[b] / cycle["fused"]
        if has_ref:
            for k, i in kinds.items():
                res[f"ratio_{k}_vs_torch_cached"] = (
                    rows[i]["backends"]["fused"]["rate"] / rows[i]["backends"][REFERENCE]["rate"])
            res["agreement_fused_vs_torch_cached"] = agreement["fused"]
    else:
        res["fused"] = "missing"
    for b in names:
        key = b.replace("-", "_")
        res[f"cycle_s_{key}"] = cycle[b]
        res[f"rate_cycle_{key}"] = total_weights / cycle[b]
        for k, i in kinds.items():
            res[f"rate_{k}_{key}"] = rows[i]["backends"][b]["rate"]
    res["quick"] = int(args.quick)
    if not has_fused:
        print("NOTE: fused backend missing: RESULT holds torch-only rates (weights per second) "
              "and cycle seconds, no ratios against fused")

    def plain(v):
        return f"{v:.6g}" if isinstance(v, float) else str(v)

    wall = time.perf_counter() - t_start
    out = Path(args.out) if args.out else (
        ROOT / "benchmarks" / "results"
        / f"bench_perturb_{args.model}_B{args.batch_size}_{device.type}"
          f"{'_quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "bench_perturb",
        "device": device_name(device),
        "device_type": device.type,
        "threads": threads,
        "torch": torch.__version__,
        "malloc": "freed memory reused (rso_ext.runtime)" if malloc_tuned else "glibc defaults",
        "rso_ext": rso_ext.__version__,
        "commit": git_commit(),
        "command": "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "model": args.model,
        "batch_size": args.batch_size,
        "quick": args.quick,
        "data": data_desc,
        "train_size": n,
        "full_train_size": full_n,
        "pool_size": args.pool_size,
        "seed": args.seed,
        "backends": names,
        "fused_available": fused_available,
        "reference": REFERENCE,
        "cycle_note": ("sum over units of n_weights / rate + setup (begin scaled to the full pool, "
                       "calibration and streams to 2000 calibration images)"
                       if args.quick else "sum over units of the measured sweep times"),
        "units": [
            {"unit": row["unit"], "weights": row["weights"],
             **{b: {k: v for k, v in row["backends"][b].items() if k != "final"} for b in names}}
            for row in rows],
        "calib_size": args.calib_size,
        "begin_scale": begin_scale,
        "calib_scale": calib_scale,
        "cycle_s": cycle,
        "weight_loops_s": loop,
        "agreement": agreement,
        "wall_s": wall,
        "measure_s": measure_s,
        "result": res,
    }
    out.write_text(json.dumps(doc, indent=1, default=float) + "\n")
    print(f"wrote {os.path.relpath(out, Path.cwd())} (wall {wall:.1f} s)")
    print("RESULT " + " ".join(f"{k}={plain(v)}" for k, v in res.items()), flush=True)
    if args.profile:
        profile_units(backends, units, x, y, device, args.profile_weights, Path(args.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
