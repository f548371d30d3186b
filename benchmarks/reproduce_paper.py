#!/usr/bin/env python
"""End-to-end reproduction of the paper's MNIST recipe (Tripathi & Singh, arXiv 2005.05955):
``paper_mnist`` trained by RSO with B=5000, 50 cycles, alpha=0.1, weight decay 1e-4.

After every cycle BatchNorm is calibrated on the training images (``RSO.calibrate``) and the test
and validation accuracies are recorded (validation: ``--val-size`` images carved from the training
set; nothing is selected on the test set), with the cumulative wall seconds (training plus the
per-cycle calibration and evaluation), the cumulative training seconds (sum of the unit sweeps)
and the seconds of every unit sweep (``SweepStats.seconds``).

``--baseline-cycles N`` also trains N cycles with ``backend="torch"`` (torch-cached, the authors'
method) from the same seed on the same data, in this process, and reports
``ratio_cycle_vs_torch_cached`` = torch mean cycle seconds / this run's mean cycle seconds (cycle
seconds = sum of the unit sweeps of the cycle). With N=0 (the default) the key is omitted.

``--quick``: a CPU rehearsal on the embedded subset, B=64, 2 cycles, 1000 validation images.

``--from-run RUN_DIR``: no training here; the rows come from a run of ``python -m rso_ext train``
(its ``config.json`` and ``metrics.jsonl``), which checkpoints after every unit sweep and resumes
with ``--resume`` -- the way to make a run of hours survive the end of a session. The cycles
finished so far are reported (with the process CPU seconds the CLI records beside wall seconds);
the model, batch size and schedule are the run's own.

Output: ``benchmarks/results/reproduce_paper_<device>[_<tag>].json`` (``--tag``; ``--quick``
defaults the tag to ``quick``), a PNG next to it when matplotlib is installed, and a final
``RESULT key=value ...`` line (docs/design.md §5).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import default_data_root, device_name, git_commit, pyplot  # noqa: E402

import rso_ext  # noqa: E402
from rso_ext import cli, data, metrics, models, runtime  # noqa: E402
from rso_ext.rso import BACKENDS, RSO  # noqa: E402

ALPHA, WEIGHT_DECAY = 0.1, 1e-4
QUICK = dict(batch_size=64, cycles=2, val_size=1000)




# -- arguments --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(models.MODELS), default="paper_mnist")
    p.add_argument("--batch-size", type=int, default=None, help="default 5000 (quick: 64)")
    p.add_argument("--cycles", type=int, default=None, help="default 50 (quick: 2)")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--data-root", default=None,
                   help="MNIST folder; 'embedded' for the subset shipped in the package (default: "
                        "$RSO_EXT_MNIST_ROOT if set, else embedded; "
                        "quick: embedded)")
    p.add_argument("--val-size", type=int, default=None,
                   help="training images held out for validation (default 5000; quick: 1000)")
    p.add_argument("--train-size", type=int, default=None,
                   help="use only the first N training images after the split (tests)")
    p.add_argument("--calib-size", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline-cycles", type=int, default=0,
                   help="also time N cycles of backend=torch (torch-cached) for the ratio")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quick", action="store_true",
                   help="CPU rehearsal: embedded subset, B=64, 2 cycles, val 1000")
    p.add_argument("--tag", default=None, help="suffix of the result file name")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop cleanly after the first unit sweep that ends past this many wall "
                        "seconds of training, keeping the cycles finished (a GPU lease's cap)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.add_argument("--from-run", default=None, metavar="RUN_DIR",
                   help="report the finished cycles of a `python -m rso_ext train` run folder "
                        "instead of training here")
    return p


def _resolve(args: argparse.Namespace) -> None:
    full = dict(batch_size=5000, cycles=50, val_size=5000)
    for k, v in (QUICK if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.data_root == "embedded" or (args.data_root is None and args.quick):
        args.data_root = None
    elif args.data_root is None:
        args.data_root = default_data_root()
    if args.tag is None and args.quick:
        args.tag = "quick"
    for k in ("batch_size", "cycles"):
        if getattr(args, k) < 1:
            raise SystemExit(f"error: --{k.replace('_', '-')} must be >= 1")
    if args.baseline_cycles < 0 or args.baseline_cycles > args.cycles:
        raise SystemExit("error: --baseline-cycles must be in [0, --cycles]")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was asked for but torch sees no CUDA GPU")


# -- training ---------------------------------------------------------------------------------------
def _make_rso(args: argparse.Namespace, backend: str) -> RSO:
    gen = torch.Generator().manual_seed(args.seed)
    model = models.get_model(args.model, generator=gen).to(args.device)
    return RSO(model, cycles=args.cycles, batch_size=args.batch_size, alpha=ALPHA,
               weight_decay=WEIGHT_DECAY, calib_size=args.calib_size, generator=gen,
               backend=backend)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train(args, splits: data.Splits) -> tuple[list[dict], str]:
    rso = _make_rso(args, args.backend)
    rows: list[dict] = []
    units: list[dict] = []
    train_s = 0.0
    _sync(args.device)
    t0 = time.perf_counter()
    for st in rso.run(splits.train_x, splits.train_y, progress=args.progress):
        train_s += st.seconds
        if (args.max_seconds is not None and not st.cycle_done
                and time.perf_counter() - t0 > args.max_seconds):
            print(f"--max-seconds {args.max_seconds:g}: stopped after {st.layer} of cycle "
                  f"{st.cycle + 1}, {len(rows)} cycle(s) finished", flush=True)
            break
        units.append(dict(layer=st.layer, weights=st.weights, accepted=st.accepted,
                          mean_loss=st.mean_loss, sigma=st.sigma, seconds=st.seconds))
        if not st.cycle_done:
            continue
        rso.calibrate(splits.train_x)
        t = metrics.evaluate(rso.model, splits.test_x, splits.test_y)
        row = dict(cycle=st.cycle + 1, test_acc=t["acc"], test_loss=t["loss"])
        if len(splits.val_x):
            v = metrics.evaluate(rso.model, splits.val_x, splits.val_y)
            row.update(val_acc=v["acc"], val_loss=v["loss"])
        _sync(args.device)
        row.update(seconds=time.perf_counter() - t0, train_seconds=train_s,
                   cycle_seconds=sum(u["seconds"] for u in units), units=units)
        rows.append(row)
        units = []
        print(f"cycle {row['cycle']}/{args.cycles}: test_acc={row['test_acc']:.4f}"
              + (f" val_acc={row['val_acc']:.4f}" if "val_acc" in row else "")
              + f" cycle {row['cycle_seconds']:.1f} s, total {row['seconds']:.1f} s", flush=True)
    return rows, rso.backend


def rows_from_run(run_dir: Path) -> list[dict]:
    """The per-cycle rows of ``train`` (same keys, plus ``cpu_seconds``) from a CLI run folder
    (main() has checked that it is one)."""
    path = run_dir / cli.METRICS
    rows: list[dict] = []
    units: list[dict] = []
    train_s = 0.0
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["type"] == "sweep":
            train_s += r["seconds"]
            units.append({k: r[k] for k in ("layer", "weights", "accepted", "mean_loss", "sigma",
                                            "seconds")})
        elif r["type"] == "cycle":
            row = {k: r[k] for k in ("cycle", "test_acc", "test_loss", "val_acc", "val_loss",
                                     "seconds", "cpu_seconds") if k in r}
            row.update(train_seconds=train_s, cycle_seconds=sum(u["seconds"] for u in units),
                       units=units)
            rows.append(row)
            units = []
    if not rows:
        raise SystemExit(f"error: --from-run {run_dir}: no finished cycle in {path} yet")
    return rows


def baseline(args, splits: data.Splits) -> list[float]:
    """Seconds of each of the first ``--baseline-cycles`` cycles with backend="torch"."""
    rso = _make_rso(args, "torch")
    cycles, acc = [], 0.0
    for st in rso.run(splits.train_x, splits.train_y, progress=args.progress):
        acc += st.seconds
        if st.cycle_done:
            cycles.append(acc)
            acc = 0.0
            print(f"baseline torch-cached cycle {len(cycles)}: {cycles[-1]:.1f} s", flush=True)
            if len(cycles) == args.baseline_cycles:
                break
    return cycles


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, xkey, xlabel in ((axes[0], "cycle", "cycle"), (axes[1], "seconds", "wall seconds")):
        x = [r[xkey] for r in rows]
        for key in ("test_acc", "val_acc"):
            if key in rows[0]:
                ax.plot(x, [100 * r[key] for r in rows], marker="o", label=key)
        ax.set(xlabel=xlabel, ylabel="accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].xaxis.get_major_locator().set_params(integer=True)   # whole cycles
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- main -------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_cfg = None
    if args.from_run:
        if args.baseline_cycles:
            raise SystemExit("error: --baseline-cycles trains here; it cannot go with --from-run")
        for need in (cli.CONFIG, cli.METRICS):
            if not (Path(args.from_run) / need).exists():
                raise SystemExit(f"error: --from-run {args.from_run}: no {need} there "
                                 "(not a run folder of `python -m rso_ext train`)")
        run_cfg = cli._read_config(Path(args.from_run))
        for k in ("model", "batch_size", "cycles", "val_size", "train_size", "calib_size",
                  "seed", "device", "backend", "data_root"):
            setattr(args, k, run_cfg[k])
        if args.data_root is None:
            args.data_root = "embedded"
    _resolve(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc_tuned = runtime.reuse_freed_memory()
    t_start = time.perf_counter()
    if run_cfg is not None:
        splits = cli._load_data(run_cfg)          # the run's own split, for the sizes
    else:
        splits = data.load_splits("mnist", root=args.data_root, val_size=args.val_size,
                                  seed=args.seed)
    if args.train_size is not None:
        splits.train_x = splits.train_x[:args.train_size]
        splits.train_y = splits.train_y[:args.train_size]
    data_desc = args.data_root or "embedded subset"
    print(f"reproduce_paper: {args.model} on {data_desc}: {len(splits.train_x)} train / "
          f"{len(splits.val_x)} val / {len(splits.test_x)} test, B={args.batch_size}, "
          f"{args.cycles} cycle(s), backend={args.backend}, device={args.device}, "
          f"{torch.get_num_threads()} thread(s)", flush=True)

    if run_cfg is not None:
        rows, backend_used = rows_from_run(Path(args.from_run)), args.backend
        print(f"from run {args.from_run}: {len(rows)} finished cycle(s)", flush=True)
    else:
        rows, backend_used = train(args, splits)
    base = baseline(args, splits) if args.baseline_cycles else []
    if not rows:
        raise SystemExit(f"error: no cycle finished within --max-seconds {args.max_seconds:g}; "
                         "raise it or lower --batch-size")

    res: dict[str, Any] = dict(model=args.model, device=args.device, batch=args.batch_size,
                               cycles=args.cycles, backend=backend_used)
    last = rows[-1]["cycle"]
    for c in sorted({1, 2, 3, 4, 5, 10, 20, 50, last}):
        if c <= last:
            res[f"test_acc_{c}"] = rows[c - 1]["test_acc"]
            if "val_acc" in rows[c - 1]:
                res[f"val_acc_{c}"] = rows[c - 1]["val_acc"]
            res[f"seconds_{c}"] = rows[c - 1]["seconds"]
            if "cpu_seconds" in rows[c - 1]:
                res[f"cpu_seconds_{c}"] = rows[c - 1]["cpu_seconds"]
    mean_cycle = sum(r["cycle_seconds"] for r in rows) / len(rows)
    res["cycle_s"] = mean_cycle
    if base:
        res["cycle_s_torch_cached"] = sum(base) / len(base)
        res["ratio_cycle_vs_torch_cached"] = res["cycle_s_torch_cached"] / mean_cycle
    else:
        print("note: --baseline-cycles 0: no torch-cached baseline, "
              "ratio_cycle_vs_torch_cached not measured", flush=True)
    res["quick"] = int(args.quick)
    res["cycles_finished"] = len(rows)

    out = Path(args.out) if args.out else (
        ROOT / "benchmarks" / "results"
        / f"reproduce_paper_{args.device}{'_' + args.tag if args.tag else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    png = None
    if not args.no_plot:
        png = plot(rows, out.with_suffix(".png"),
                   f"{args.model}, RSO B={args.batch_size}, {backend_used}, {args.device}")
    wall = time.perf_counter() - t_start
    doc = {
        "benchmark": "reproduce_paper",
        "device": device_name(args.device),
        "device_type": args.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "malloc": "freed memory reused (rso_ext.runtime)" if malloc_tuned else "glibc defaults",
        "rso_ext": getattr(rso_ext, "__version__", None),
        "commit": git_commit(),
        "command": "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
                   if argv is None else "reproduce_paper.main(" + shlex.join(list(argv)) + ")",
        "model": args.model,
        "data": data_desc,
        "train_size": len(splits.train_x),
        "val_size": len(splits.val_x),
        "test_size": len(splits.test_x),
        "batch_size": args.batch_size,
        "cycles": args.cycles,
        "alpha": ALPHA,
        "weight_decay": WEIGHT_DECAY,
        "calib_size": args.calib_size,
        "backend": args.backend,
        "backend_used": backend_used,
        "seed": args.seed,
        "quick": args.quick,
        "max_seconds": args.max_seconds,
        "run_dir": os.path.relpath(args.from_run, ROOT) if args.from_run else None,
        "run_config": run_cfg,
        "seconds_note": "seconds: cumulative wall time incl. per-cycle BN calibration and "
                        "evaluation; train_seconds / cycle_seconds: sums of unit sweeps",
        "rows": rows,
        "baseline_torch_cached_cycle_s": base,
        "png": png.name if png else None,   # beside the JSON
        "wall_s": wall,
        "result": res,
    }
    out.write_text(json.dumps(doc, indent=1, default=float) + "\n")
    print(f"wrote {out} (wall {wall:.1f} s)", flush=True)

    def plain(v):
        return f"{v:.6g}" if isinstance(v, float) else str(v)

    print("RESULT " + " ".join(f"{k}={plain(v)}" for k, v in res.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
