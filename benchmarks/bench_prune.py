#!/usr/bin/env python
"""Writing many weights of a unit at once: ``set_many`` against one ``set`` per weight, on the
fused backend's evaluator (what the mask search, ``rso_ext.methods.ticket``, does when it prunes
the excess of a unit to its sparsity cap).

    python benchmarks/bench_prune.py --model pytorch_example --unit fc1.weight --pool 20000 \
        --fraction 0.5 --data-root MNIST_DIR

The evaluator is ``RSO(model, backend="fused").sweeper(unit)`` after ``begin`` on the first
``--pool`` training images (``X_d`` and ``Z_d`` cached, as in a sweep). The weights written are
a random ``--fraction`` of the unit (seeded), set to zero.

* ``set``: one ``fused_set_weight`` per weight (``Z_d`` updated over the pool per move), timed
  on the first ``--sample`` of those weights and extrapolated linearly to all of them (each call
  is the same pass over the pool);
* ``set_many``: one call for all of them (the weights written, then ``Z_d`` rebuilt in one pass
  of the layer).

Each is timed ``--repeats`` times in process CPU time (one thread by default), the weights and
``Z_d`` put back between repeats. The two must leave the same ``Z_d``: after the sampled weights
are written both ways, the largest difference between the two ``Z_d`` relative to their scale is
printed and recorded (float rounding only: a move adds its delta, the rebuild sums afresh).

Output: ``benchmarks/results/bench_prune_<model>_<unit, "." as "_">_cpu.json`` (or ``--out``)
with the per-repeat seconds, the ratio, the device and the commit, and a final ``RESULT`` line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import command_line, default_data_root, device_name, git_commit  # noqa: E402

from rso_ext import batchnorm, models, runtime  # noqa: E402
from rso_ext.data import load_splits  # noqa: E402
from rso_ext.rso import RSO  # noqa: E402


def cpu_seconds(f) -> float:
    t = time.process_time()
    f()
    return time.process_time() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["paper_mnist", "pytorch_example"],
                   default="pytorch_example")
    p.add_argument("--unit", default="fc1.weight",
                   help="the unit written, as module.parameter (default fc1.weight)")
    p.add_argument("--pool", type=int, default=20000, help="training images cached (default 20000)")
    p.add_argument("--fraction", type=float, default=0.5,
                   help="share of the unit's weights written (default 0.5)")
    p.add_argument("--sample", type=int, default=1000,
                   help="weights timed one set at a time, extrapolated (default 1000)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=default_data_root(),
                   help="MNIST folder (default: $RSO_EXT_MNIST_ROOT if set, else the embedded "
                        "10k subset; 'embedded' forces the subset)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = p.parse_args(argv)
    if not 0.0 < args.fraction <= 1.0:
        p.error(f"--fraction must be in (0, 1], got {args.fraction}")
    for name in ("pool", "sample", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")

    torch.set_num_threads(args.threads)
    runtime.reuse_freed_memory()
    root = None if args.data_root == "embedded" else args.data_root
    splits = load_splits(root=root)
    x = splits.train_x[:args.pool].contiguous()
    y = splits.train_y[:args.pool].contiguous()
    model = models.get_model(args.model, torch.Generator().manual_seed(args.seed))
    rso = RSO(model, batch_size=min(512, len(x)), backend="fused",
              generator=torch.Generator().manual_seed(args.seed))
    rso.calibrate(x)
    names = [f"{u.module_name}.{u.param_name}" for u in rso.units]
    if args.unit not in names:
        p.error(f"--unit {args.unit!r} is not a unit of {args.model}; its units: "
                f"{', '.join(names)}")
    unit = rso.units[names.index(args.unit)]
    flat = unit.param.data.view(-1)
    n = max(1, int(round(args.fraction * flat.numel())))
    ks = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(args.seed))[:n]
    ks = ks.sort().values
    sample = ks[:min(args.sample, n)]
    zeros = torch.zeros(n, dtype=flat.dtype)
    print(f"bench_prune: {args.model} {args.unit} ({flat.numel():,} weights), {n:,} written "
          f"({args.fraction:g}), pool {len(x):,} images, {args.threads} thread(s)", flush=True)

    with batchnorm.search_mode(model, rso._order, unit.position):
        ev = rso.sweeper(unit)
        ev.begin(x, y)
        original = flat[ks].clone()
        z0 = ev.z.clone()

        def put_back():
            flat[ks] = original
            ev.z.copy_(z0)

        def one_at_a_time():
            for k in sample.tolist():
                ev.set(k, torch.zeros((), dtype=flat.dtype))

        per_weight, many = [], []
        for _ in range(args.repeats):
            per_weight.append(cpu_seconds(one_at_a_time) * n / len(sample))
            z_set = ev.z.clone()
            put_back()
            ev.set_many(sample, zeros[:len(sample)])
            scale = float(z_set.abs().max()) or 1.0
            rel_diff = float((ev.z - z_set).abs().max()) / scale
            put_back()
            many.append(cpu_seconds(lambda: ev.set_many(ks, zeros)))
            put_back()
        ev.end()

    ratio = statistics.median(per_weight) / statistics.median(many)
    print(f"  set, one per weight: {', '.join(f'{s:.2f}' for s in per_weight)} CPU-s "
          f"(extrapolated from {len(sample):,} weights)")
    print(f"  set_many:            {', '.join(f'{s:.3f}' for s in many)} CPU-s")
    print(f"  ratio of medians {ratio:.1f}x; Z_d after the sampled weights both ways differs by "
          f"{rel_diff:.1e} of its largest value")
    doc = dict(benchmark="bench_prune", device=device_name("cpu"), threads=args.threads,
               torch=torch.__version__, commit=git_commit(),
               command=command_line(argv),
               model=args.model, unit=args.unit, unit_weights=flat.numel(), written=n,
               pool=len(x), sample=len(sample), repeats=args.repeats,
               set_cpu_seconds=per_weight, set_many_cpu_seconds=many, ratio=ratio,
               z_rel_diff=rel_diff)
    unit_tag = args.unit.replace(".", "_")
    out = Path(args.out) if args.out else (
        ROOT / "benchmarks" / "results" / f"bench_prune_{args.model}_{unit_tag}_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {os.path.relpath(out, Path.cwd())}")
    print(f"RESULT model={args.model} unit={args.unit} written={n} pool={len(x)} "
          f"set_s={statistics.median(per_weight):.3f} set_many_s={statistics.median(many):.4f} "
          f"ratio={ratio:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
