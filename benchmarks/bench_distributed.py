#!/usr/bin/env python
"""One process with T threads against W gloo processes with T/W threads each, on a paper_mnist
cycle of the torch or the fused backend (docs/design.md §8), and what one reduction costs per
weight.

    python benchmarks/bench_distributed.py --data-root MNIST_DIR --batch-size 512 --ranks 2
    python benchmarks/bench_distributed.py ... --backend fused

For every unit of paper_mnist the first n and then 2n weights are swept (``RSO.sweep_unit``,
n = ``--weights``): the difference gives the seconds per weight, the rest the unit's fixed cost
(its input cache), and the cycle seconds of each set-up are those scaled to the units' sizes, measured in the same run of this script
(one process first, then the ranks, spawned by it). The reduction cost is the mean time of an
``all_reduce`` of the K=3 float64 losses between the ranks (``--reductions`` of them, after a
warm-up), which each weight pays once, plus, per BatchNorm with batch statistics in its suffix,
once per candidate on the torch backend and once for all K candidates on the fused one. Over the
ranks the fused backend runs its device-generic ATen passes; the one process, its CPU passes.

Output: ``benchmarks/results/bench_distributed_paper_mnist_B<B>[_fused]_cpu.json`` and a
``RESULT key=value ...`` line. Time it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import command_line, default_data_root, device_name, git_commit  # noqa: E402

from rso_ext import RSO, data, models, runtime  # noqa: E402


def _cycle(args, threads: int) -> dict:
    """Extrapolated cycle seconds of ``args.backend`` on this process (and its group)."""
    torch.set_num_threads(threads)
    runtime.reuse_freed_memory()
    root = None if args.data_root in (None, "embedded") else args.data_root
    s = data.load_splits("mnist", root=root, val_size=0)
    x, y = s.train_x[:args.train_size], s.train_y[:args.train_size]
    rso = RSO(models.paper_mnist(torch.Generator().manual_seed(0)), cycles=50,
              batch_size=args.batch_size, backend=args.backend,
              generator=torch.Generator().manual_seed(1))
    rso.check(x, y)
    rso.sweep_unit(0, x, y, weights=2)                    # warm-up
    units, total = [], 0.0
    for i, u in enumerate(rso.units):
        # a sweep of n weights costs once (the cache of the swept layer's input) plus n times:
        # two sweeps of n and 2n weights give both
        n = max(1, min(args.weights, u.param.numel() // 2))
        t = []
        for m in (n, 2 * n):
            t0 = time.perf_counter()
            rso.sweep_unit(i, x, y, weights=m)
            t.append(time.perf_counter() - t0)
        per = max(t[1] - t[0], 0.0) / n
        once = max(t[0] - n * per, 0.0)
        units.append(dict(layer=u.name, weights=u.param.numel(), s_per_weight=per,
                          s_per_sweep=once))
        total += once + per * u.param.numel()
    return dict(cycle_s=total, units=units)


def _rank(rank: int, world: int, init: str, out: str, args) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        res = _cycle(args, max(1, args.threads // world))
        t = torch.zeros(3, dtype=torch.float64)
        for _ in range(50):
            dist.all_reduce(t)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(args.reductions):
            dist.all_reduce(t)
        res["reduction_s"] = (time.perf_counter() - t0) / args.reductions
        if rank == 0:
            Path(out).write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=default_data_root(),
                   help="MNIST folder (default: $RSO_EXT_MNIST_ROOT, else the embedded subset)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--train-size", type=int, default=2048, help="the search pool")
    p.add_argument("--weights", type=int, default=8, help="weights timed per unit")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--backend", choices=["torch", "fused"], default="torch")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads of the single process; each rank gets threads / ranks")
    p.add_argument("--reductions", type=int, default=2000)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.ranks < 2 or args.batch_size % args.ranks:
        p.error("--ranks must be >= 2 and divide --batch-size")

    single = _cycle(args, args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        mp.spawn(_rank, args=(args.ranks, os.path.join(tmp, "rdzv"), out, args),
                 nprocs=args.ranks, join=True)
        ranked = json.loads(Path(out).read_text())
    result = dict(backend=args.backend, batch=args.batch_size, ranks=args.ranks,
                  threads=args.threads,
                  cycle_s_one_process=single["cycle_s"], cycle_s_ranks=ranked["cycle_s"],
                  speedup=single["cycle_s"] / ranked["cycle_s"],
                  reduction_us=1e6 * ranked["reduction_s"])
    doc = dict(benchmark="bench_distributed", device=device_name("cpu"), torch=torch.__version__,
               commit=git_commit(),
               command=command_line(argv),
               model="paper_mnist", backend=args.backend, train_size=args.train_size,
               weights_timed_per_unit=args.weights, one_process=single, ranks=ranked,
               result=result)
    path = Path(args.out) if args.out else (ROOT / "benchmarks" / "results"
                                            / f"bench_distributed_paper_mnist_B{args.batch_size}"
                                              f"{'_fused' if args.backend == 'fused' else ''}"
                                              "_cpu.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")
    print("RESULT " + " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in result.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
