#!/usr/bin/env python
"""Ablations of the paper's recipe: short runs that each change one setting, compared at the same
cycle by validation accuracy (why a run falls short of the paper's 98 % after 5 cycles).

    python benchmarks/ablate_paper.py --data-root data/mnist                  # hours on 2 cores
    python benchmarks/ablate_paper.py --data-root data/mnist --device cuda    # minutes on a GPU
    python benchmarks/ablate_paper.py ... --variants base,sampler_random      # a subset
    python benchmarks/ablate_paper.py ... --variants base,candidates_5,batch_doubling \
        --plot benchmarks/results/variants_paper_cpu.png     # accuracy against CPU time

Every variant is one ``python -m rso_ext train`` with the base settings (paper_mnist, B=2000, the
first 10,000 training images as the search pool, 5,000 held out for validation, a 3-cycle
schedule, seed 0; each overridable below) and one change (``VARIANTS``). Its run folder under
``--out-dir`` is checkpointed after every unit, so an interrupted ablation continues where it
stopped when the same command runs again, and a finished variant is not run twice. Compare
variants by validation accuracy; the CLI also measures the test set once per cycle, and the JSON
keeps it for the report.

Two variants are the recipe's faster candidates rather than ablations (issue 18: accuracy per
hour of compute): ``candidates_5`` tries ``w' +- 2 delta`` too (K = 5), ``batch_doubling`` starts
at an eighth of the batch size and doubles it every cycle. Compare those by test accuracy against
CPU seconds (``--plot``), not at the same cycle.

Output: ``benchmarks/results/ablate_paper_<device>.json`` (per variant: the command, and per cycle
val/test accuracy and cumulative wall and CPU seconds), a table, the last cycle's change against
``base``, and with ``--plot`` a PNG of test accuracy against CPU seconds per variant.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import command_line, device_name, git_commit  # noqa: E402

# one change each against the base settings; None removes the base option, a callable gives the
# value from the arguments
VARIANTS: dict[str, dict[str, str | None | Callable[[argparse.Namespace], str]]] = {
    "base": {},
    "sampler_random": {"--sampler": "random"},
    "sigma_empirical": {"--sigma": "empirical"},
    "sample_scale_0.5": {"--sample-scale": "0.5"},
    "sample_scale_2": {"--sample-scale": "2"},
    "no_weight_decay": {"--weight-decay": "0"},
    "calib_500": {"--calib-size": "500"},
    "batch_1000": {"--batch-size": "1000"},
    "pool_all": {"--train-size": None},
    "candidates_5": {"--candidate-steps": "1,2"},
    "batch_doubling": {"--batch-start": lambda a: str(max(1, a.batch_size // 8))},
}


def change(args, variant: str) -> dict[str, str | None]:
    """``variant``'s options against the base settings, resolved for ``args``."""
    return {k: v(args) if callable(v) else v for k, v in VARIANTS[variant].items()}


def train_args(args, variant: str, out: Path) -> list[str]:
    """The CLI arguments of ``variant``'s run into ``out``."""
    opts: dict[str, str | None] = {
        "--model": args.model, "--batch-size": str(args.batch_size),
        "--train-size": str(args.train_size), "--val-size": str(args.val_size),
        "--cycles": str(args.cycles), "--calib-size": str(args.calib_size),
        "--seed": str(args.seed), "--device": args.device,
    }
    if args.data_root:
        opts["--data-root"] = args.data_root
    if args.threads:
        opts["--threads"] = str(args.threads)
    opts.update(change(args, variant))
    argv = ["train", "--out", str(out), "--no-progress"]
    for k, v in opts.items():
        if v is not None:
            argv += [k, v]
    return argv


def cycles_of(run: Path) -> list[dict]:
    """The per-cycle rows of a run folder's metrics (none if it has not started)."""
    f = run / "metrics.jsonl"
    if not f.exists():
        return []
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("type") == "cycle"]


def run_variant(args, variant: str) -> dict:
    out = Path(args.out_dir) / variant
    argv = train_args(args, variant, out)
    if len(cycles_of(out)) < args.cycles:
        cmd = [sys.executable, "-m", "rso_ext"]
        cmd += (["train", "--resume", str(out), "--no-progress"]
                if (out / "checkpoint.pt").exists() else argv)
        print(f"ablate_paper: {variant}: {shlex.join(cmd[2:])}", flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    rows = cycles_of(out)
    res = {"command": "python -m rso_ext " + shlex.join(argv), "run": str(out)}
    for r in rows:
        c = r["cycle"]
        res[f"val_acc_{c}"] = r.get("val_acc")
        res[f"test_acc_{c}"] = r.get("test_acc")
        res[f"seconds_{c}"] = r.get("seconds")
        res[f"cpu_seconds_{c}"] = r.get("cpu_seconds")
    return res


def plot(results: dict, path: Path, title: str) -> None:
    """Test accuracy after each cycle against the run's cumulative CPU seconds, per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for v, r in results.items():
        pts = [(r[f"cpu_seconds_{c}"] / 3600, 100 * r[f"test_acc_{c}"]) for c in range(1, 1000)
               if r.get(f"cpu_seconds_{c}") is not None and r.get(f"test_acc_{c}") is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=v)
    ax.set_xlabel("CPU hours (all threads of the run)")
    ax.set_ylabel("test accuracy after each cycle (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=os.environ.get("RSO_EXT_MNIST_ROOT"),
                   help="MNIST folder (default $RSO_EXT_MNIST_ROOT; none: the embedded subset)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma list among {','.join(VARIANTS)} (default: all)")
    p.add_argument("--model", default="paper_mnist")
    p.add_argument("--batch-size", type=int, default=2000)
    p.add_argument("--train-size", type=int, default=10000, help="the search pool")
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--calib-size", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-dir", default="runs/ablate_paper",
                   help="a run folder per variant (kept: the ablation resumes from them)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also draw test accuracy against CPU seconds per variant")
    args = p.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose among {', '.join(VARIANTS)}")
    results = {v: run_variant(args, v) for v in names}

    last = args.cycles
    print(f"\n{'variant':<18} " + " ".join(f"{'val ' + str(c):>8}" for c in range(1, last + 1))
          + f" {'vs base':>8} {'seconds':>9}")
    base = results.get("base", {}).get(f"val_acc_{last}")
    for v, r in results.items():
        accs = " ".join(f"{100 * r[f'val_acc_{c}']:7.2f}%" if r.get(f"val_acc_{c}") is not None
                        else f"{'-':>8}" for c in range(1, last + 1))
        diff = (f"{100 * (r[f'val_acc_{last}'] - base):+7.2f}%"
                if base is not None and r.get(f"val_acc_{last}") is not None else f"{'-':>8}")
        secs = r.get(f"seconds_{last}")
        print(f"{v:<18} {accs} {diff} {secs if secs is None else round(secs):>9}")
    doc = dict(benchmark="ablate_paper", device=device_name(args.device), commit=git_commit(),
               command=command_line(argv),
               settings=dict(model=args.model, batch_size=args.batch_size,
                             train_size=args.train_size, val_size=args.val_size,
                             cycles=args.cycles, calib_size=args.calib_size, seed=args.seed),
               variants={v: change(args, v) for v in names}, results=results)
    path = Path(args.out) if args.out else (ROOT / "benchmarks" / "results"
                                            / f"ablate_paper_{args.device}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")
    if args.plot:
        s = doc["settings"]
        plot(results, Path(args.plot), f"{args.model}, B={s['batch_size']}, pool "
             f"{s['train_size']}, {s['cycles']}-cycle schedule, {doc['device']}")
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
