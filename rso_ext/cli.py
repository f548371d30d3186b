"""Command line: ``python -m rso_ext train|eval|plot`` (see README.md)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from . import checkpoint, data, distributed, memory, metrics, models, precision, runtime
from .methods import METHODS, Method, from_config, method_help, takers
from .precision import PRECISIONS
from .rso import BACKENDS, RSO, check_candidate_steps
from .sweep import NonFiniteLossError
from .streams import SAMPLERS

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CKPT = "checkpoint.pt"
RESULT = "result.json"

# What `python -m rso_ext train` runs with no other argument: paper_mnist on the embedded MNIST
# subset, sized to finish in a few minutes on a 2-core CPU (README.md gives the accuracy reached).
DEFAULTS = dict(model="paper_mnist", data="mnist", data_root=None, download=False, cycles=5,
                batch_size=128, train_size=None, val_size=1000, normalize="mean",
                sampler="shuffle", alpha=0.1, weight_decay=1e-4, sigma="he", sample_scale=1.0,
                calib_size=2000, device="cpu", backend="auto", precision="exact", pool_size=None,
                seed=0, threads=None, candidate_steps=None, batch_start=None,
                method="rso", generations=None, population=None, noise=None, lr=None,
                temperature=None, sparsity=None, params=None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rso_ext",
                                description="Gradient-free training by random search (RSO).")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model with RSO (or resume a run)")
    t.add_argument("--model", choices=sorted(models.MODELS), default=DEFAULTS["model"])
    t.add_argument("--data", choices=sorted(data.DATASETS), default=DEFAULTS["data"])
    t.add_argument("--data-root", default=None,
                   help="folder holding <Name>/raw/*.gz as torchvision lays it out "
                        "(default: the MNIST subset shipped in the package)")
    t.add_argument("--download", action="store_true",
                   help="fetch the standard files into --data-root if they are missing")
    t.add_argument("--cycles", type=_positive_int, default=DEFAULTS["cycles"])
    t.add_argument("--batch-size", type=_positive_int, default=DEFAULTS["batch_size"])
    t.add_argument("--train-size", type=_positive_int, default=None,
                   help="use only the first N training images (after the validation split)")
    t.add_argument("--val-size", type=_nonneg_int, default=DEFAULTS["val_size"],
                   help="training images held out for validation")
    t.add_argument("--normalize", choices=["mean", "meanstd"], default=DEFAULTS["normalize"])
    t.add_argument("--sampler", choices=SAMPLERS, default=DEFAULTS["sampler"])
    t.add_argument("--alpha", type=float, default=DEFAULTS["alpha"])
    t.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    t.add_argument("--sigma", choices=["he", "empirical"], default=DEFAULTS["sigma"])
    t.add_argument("--sample-scale", type=float, default=DEFAULTS["sample_scale"])
    t.add_argument("--calib-size", type=_positive_int, default=DEFAULTS["calib_size"])
    t.add_argument("--candidate-steps", type=_steps, default=None, metavar="S[,S...]",
                   help="multiples of the step tried on each side of w' (default 1: the paper's "
                        "three candidates; 1,2 tries five)")
    t.add_argument("--batch-start", type=_positive_int, default=None, metavar="B0",
                   help="first cycle's batch size, doubled every cycle up to --batch-size "
                        "(default: --batch-size throughout)")
    t.add_argument("--device", choices=["cpu", "cuda"], default=DEFAULTS["device"])
    t.add_argument("--backend", choices=BACKENDS, default=DEFAULTS["backend"],
                   help="fused: the compiled evaluation; torch: the pure-PyTorch reference; "
                        "auto: fused when the model can be lowered")
    t.add_argument("--precision", choices=PRECISIONS, default=DEFAULTS["precision"],
                   help="exact: float32 convolutions without TF32 on CUDA (the CPU's decisions); "
                        "tf32: tensor cores on CUDA (faster, decisions within TF32's rounding); "
                        "no effect on the CPU")
    t.add_argument("--pool-size", type=_positive_int, default=None,
                   help="search each unit on this many training samples drawn afresh "
                        "(bounds the caches' memory; default: the whole training set)")
    t.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    t.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    t.add_argument("--method", choices=sorted(METHODS), default=DEFAULTS["method"],
                   help=method_help(DEFAULTS["method"]) + "; see rso_ext.methods")
    # which methods take each option: from the registry (each class's cli_options)
    m = t.add_argument_group("method options (default: the method's own)")
    m.add_argument("--generations", type=_positive_int, default=None,
                   help=f"{takers('generations')}: generations per cycle")
    m.add_argument("--population", type=_positive_int, default=None, help=takers("population"))
    m.add_argument("--noise", type=float, default=None,
                   help=f"{takers('noise')}: perturbation / mutation std")
    m.add_argument("--lr", type=float, default=None, help=f"{takers('lr')}: step size")
    m.add_argument("--temperature", type=float, default=None,
                   help=f"{takers('temperature')}: first temperature")
    m.add_argument("--sparsity", type=float, default=None,
                   help=f"{takers('sparsity')}: target sparsity")
    m.add_argument("--params", default=None,
                   help=f"{takers('params')}: parameters searched (all, bn, last, bn+last)")
    t.add_argument("--out", default=None, help="run folder (default: runs/<model>-<time>)")
    t.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue the run in RUN_DIR exactly where it stopped")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")

    e = sub.add_parser("eval", help="accuracy of a run's latest checkpoint")
    e.add_argument("run_dir")
    e.add_argument("--device", choices=["cpu", "cuda"], default=None)

    pl = sub.add_parser("plot", help="training loss over time and accuracy per cycle, to a PNG")
    pl.add_argument("run_dir")
    pl.add_argument("--output", default=None, help="PNG path (default: RUN_DIR/curves.png)")
    return p


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def _steps(s: str) -> list[float]:
    try:
        out = [float(v) for v in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be numbers separated by commas, got {s!r}") \
            from None
    try:                          # RSO's own rules, checked before any file is made
        return list(check_candidate_steps(out))
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _nonneg_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


# -- helpers ------------------------------------------------------------------------------------
def _load_data(cfg: dict[str, Any]) -> data.Splits:
    splits = data.load_splits(cfg["data"], root=cfg["data_root"], val_size=cfg["val_size"],
                              normalize=cfg["normalize"], seed=cfg["seed"],
                              download=cfg["download"])
    if cfg["train_size"] is not None:
        splits.train_x = splits.train_x[:cfg["train_size"]]
        splits.train_y = splits.train_y[:cfg["train_size"]]
    return splits


def _build(cfg: dict[str, Any], device: str) -> Method:
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was asked for but torch sees no CUDA GPU")
    gen = torch.Generator().manual_seed(cfg["seed"])
    model = models.get_model(cfg["model"], generator=gen).to(device)
    return from_config(cfg, model, gen)      # the class registered under cfg["method"]


def _append_lines(path: Path, records: Sequence[dict]) -> None:
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _truncate_lines(path: Path, keep: int) -> None:
    """Keep the first ``keep`` lines of ``path`` (drops what was logged after the checkpoint)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    if len(lines) != keep:
        checkpoint.atomic_write_bytes(path, "".join(lines[:keep]).encode())


def _read_config(run_dir: Path) -> dict[str, Any]:
    """The run's config.json, or an error naming the file."""
    path = run_dir / CONFIG
    try:
        cfg = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a readable run config ({e})") from None
    missing = [k for k in ("model", "data", "cycles", "batch_size", "seed") if k not in cfg] \
        if isinstance(cfg, dict) else ["(not a JSON object)"]
    if missing:
        raise ValueError(f"{path} is not a run config: missing {missing}")
    return cfg


def _load_latest(run_dir: Path, map_location: Any = "cpu"):
    """(checkpoint, file) of the newest good checkpoint of ``run_dir`` (None if there is none);
    a fallback to the previous one is reported on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", checkpoint.CheckpointWarning)
        found = checkpoint.load_latest(run_dir / CKPT, map_location=map_location)
    for w in caught:
        if issubclass(w.category, checkpoint.CheckpointWarning):
            print(f"warning: {w.message}", file=sys.stderr, flush=True)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return found


def _count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _evaluate(rso: RSO, splits: data.Splits, mode: str = "exact") -> dict[str, float]:
    """Validation and test metrics after recalibrating BatchNorm, under precision ``mode``."""
    with precision.precision(mode):
        rso.calibrate(splits.train_x)
        out = {}
        if len(splits.val_x):
            v = metrics.evaluate(rso.model, splits.val_x, splits.val_y)
            out.update(val_acc=v["acc"], val_loss=v["loss"])
        t = metrics.evaluate(rso.model, splits.test_x, splits.test_y)
        out.update(test_acc=t["acc"], test_loss=t["loss"])
    return out


def _restarted_by_torchrun() -> bool:
    """Whether torchrun restarted this worker group after a failure (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def _stop_note(sweeps, rso: RSO, run_dir: Path):
    """``sweeps`` as they come; a non-finite loss is re-raised saying which checkpoint is kept."""
    try:
        yield from sweeps
    except NonFiniteLossError as e:
        raise NonFiniteLossError(
            f"{e}. Training stopped; the last good checkpoint is kept: {run_dir / CKPT} "
            f"(cycle {rso.cycle + 1}, unit {rso.unit + 1}) with {_count_lines(run_dir / METRICS)} "
            f"lines of {METRICS}") from None


def _check_method_options(cfg: dict[str, Any]) -> None:
    """SystemExit naming an option given on the command line that the chosen method does not
    take (it would be ignored silently)."""
    taken = METHODS[cfg["method"]].cli_options
    options = {o for c in METHODS.values() for o in c.cli_options}
    stray = [o for o in sorted(options) if o not in taken and cfg.get(o) != DEFAULTS.get(o)]
    if stray:
        raise SystemExit("error: " + "; ".join(
            f"--{o.replace('_', '-')} is not an option of --method {cfg['method']} (it is "
            f"{takers(o)}'s)" for o in stray))


# -- commands -----------------------------------------------------------------------------------
def train(args: argparse.Namespace) -> int:
    if args.resume:
        run_dir = Path(args.resume)
        cfg_path = run_dir / CONFIG
        if not cfg_path.exists():
            raise SystemExit(f"error: --resume {run_dir}: no {CONFIG} there (not a run folder)")
        cfg = _read_config(run_dir)
    else:
        cfg = {k: getattr(args, k) for k in DEFAULTS}
        _check_method_options(cfg)
        run_dir = Path(args.out or f"runs/{cfg['model']}-{time.strftime('%Y%m%d-%H%M%S')}")
        if (run_dir / CONFIG).exists() and _restarted_by_torchrun():
            # torchrun restarts a failed worker group with the same command: continue the run
            if _read_config(run_dir) != json.loads(json.dumps(cfg)):
                raise SystemExit(f"error: restarted by torchrun, but {run_dir} holds a run with "
                                 "another configuration")
            args.resume = str(run_dir)
        elif (run_dir / CONFIG).exists():
            raise SystemExit(f"error: {run_dir} already holds a run; use --resume {run_dir} "
                             "to continue it or choose another --out")
        if run_dir.exists() and not run_dir.is_dir():
            raise SystemExit(f"error: --out {run_dir} is a file, not a folder")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    runtime.reuse_freed_memory()
    # under torchrun: one run over every rank; rank 0 alone writes the run folder
    several = distributed.init_from_env(cfg["device"])
    writer = distributed.is_writer()
    # everything that can be refused (data, arguments, model, memory) is, before any file is made
    splits = _load_data(cfg)
    rso = _build(cfg, cfg["device"])
    if hasattr(rso, "check"):
        rso.check(splits.train_x, splits.train_y)
    metrics_path, ckpt_path = run_dir / METRICS, run_dir / CKPT
    elapsed = cpu_elapsed = 0.0
    if args.resume:
        if writer:
            for stale in run_dir.glob(".*.tmp*"):     # left by a write that was killed
                stale.unlink(missing_ok=True)
        found = _load_latest(run_dir)
        if found is None:                             # killed before the first checkpoint
            if writer:
                _truncate_lines(metrics_path, 0)
        else:
            ck, src = found
            rso.load_state_dict(ck["rso"])
            have = _count_lines(metrics_path)
            if have < ck["metrics_lines"]:
                raise checkpoint.CheckpointError(
                    f"{metrics_path} has {have} lines but {src} records {ck['metrics_lines']}: "
                    "the metrics file was truncated or replaced after that checkpoint")
            if writer:
                _truncate_lines(metrics_path, ck["metrics_lines"])
            elapsed = ck["elapsed"]
            cpu_elapsed = ck.get("cpu_elapsed", 0.0)   # older checkpoints lack it
            if writer:
                print(f"resuming {run_dir} at cycle {rso.cycle + 1}, unit {rso.unit + 1} "
                      f"(from {src.name})", flush=True)
    elif writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_bytes(run_dir / CONFIG, json.dumps(cfg, indent=2).encode())
        metrics_path.unlink(missing_ok=True)
    # no rank starts before every rank has loaded the checkpoint rank 0 will next replace
    distributed.barrier()
    say = print if writer else (lambda *a, **k: None)
    say(f"run folder: {run_dir}\ntraining {cfg['model']} on {len(splits.train_x)} "
        f"{cfg['data']} images, B={cfg['batch_size']}"
        + (f" (from {cfg['batch_start']}, doubled per cycle)" if cfg.get("batch_start") else "")
        + f", {cfg['cycles']} cycle(s), "
        f"device={cfg['device']}" + (f", {distributed.world()[1]} processes" if several else ""),
        flush=True)
    if getattr(rso, "backend_reason", ""):
        say(f"backend {rso.backend_reason}", flush=True)

    # wall seconds and this process's CPU seconds (all threads), both carried across resumes;
    # CPU seconds do not count time the process was stopped or waiting for another process
    t_start = time.perf_counter() - elapsed
    c_start = time.process_time() - cpu_elapsed
    mode = cfg.get("precision", "exact")       # runs made before the option were exact
    for stats in _stop_note(precision.during(rso.run(splits.train_x, splits.train_y,
                                                     progress=writer and not args.no_progress),
                                             mode), rso, run_dir):
        records = [dict(type="sweep", **stats.as_dict())]
        if stats.cycle_done:
            ev = _evaluate(rso, splits, mode)
            rec = dict(type="cycle", cycle=stats.cycle + 1,
                       seconds=time.perf_counter() - t_start,
                       cpu_seconds=time.process_time() - c_start, **ev)
            records.append(rec)
            say(f"cycle {rec['cycle']}/{cfg['cycles']}: "
                + " ".join(f"{k}={v:.4f}" for k, v in ev.items())
                + f" ({rec['seconds']:.1f} s)", flush=True)
        if writer:
            _append_lines(metrics_path, records)
            checkpoint.save({"rso": rso.state_dict(), "metrics_lines": _count_lines(metrics_path),
                             "elapsed": time.perf_counter() - t_start,
                             "cpu_elapsed": time.process_time() - c_start}, ckpt_path)

    result = dict(model=cfg["model"], method=cfg.get("method", "rso"), data=cfg["data"],
                  cycles=cfg["cycles"],
                  batch_size=cfg["batch_size"], train_size=len(splits.train_x),
                  seconds=time.perf_counter() - t_start, **_evaluate(rso, splits, mode))
    if several:
        result["processes"] = distributed.world()[1]
    if writer:
        checkpoint.atomic_write_bytes(run_dir / RESULT, json.dumps(result, indent=2).encode())
    say(_summary(result, cfg, run_dir), flush=True)
    return 0


# the paper's MNIST settings on the full data (README.md, "Reproducing the paper")
PAPER_COMMAND = ("python -m rso_ext train --data-root MNIST_DIR --val-size 5000 "
                 "--batch-size 5000 --cycles 50")


def _summary(result: dict[str, Any], cfg: dict[str, Any], run_dir: Path) -> str:
    """The closing lines of ``train``: what was reached, where it is, what to run next."""
    acc = "  ".join(f"{k.split('_')[0]} {100 * result[k]:.2f} %"
                    for k in ("test_acc", "val_acc") if k in result)
    return (f"\ndone: {acc} after {cfg['cycles']} cycle(s) in {result['seconds']:.0f} s\n"
            f"  run folder: {run_dir} (result.json, metrics.jsonl, checkpoint.pt)\n"
            f"  plot:       python -m rso_ext plot {run_dir}   (needs matplotlib)\n"
            f"  evaluate:   python -m rso_ext eval {run_dir}\n"
            f"  the paper's settings on the full MNIST (hours on a CPU):\n"
            f"              {PAPER_COMMAND}")


def evaluate_run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not (run_dir / CONFIG).exists():
        raise SystemExit(f"error: {run_dir} is not a run folder (no {CONFIG})")
    cfg = _read_config(run_dir)
    device = args.device or cfg["device"]
    splits = _load_data(cfg)
    rso = _build(cfg, device)
    found = _load_latest(run_dir, map_location=device)
    if found is None:
        raise checkpoint.CheckpointError(f"{run_dir} holds no checkpoint yet ({CKPT})")
    rso.load_state_dict(found[0]["rso"])
    out = dict(cycle=rso.cycle, unit=rso.unit,
               **_evaluate(rso, splits, cfg.get("precision", "exact")))
    print(json.dumps(out, indent=2))
    return 0


def plot(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    path = run_dir / METRICS
    if not path.exists():
        raise SystemExit(f"error: {run_dir} has no {METRICS}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: plot needs matplotlib (pip install matplotlib)") from None
    from matplotlib.ticker import MaxNLocator
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    sweeps = [r for r in rows if r["type"] == "sweep"]
    cyc = [r for r in rows if r["type"] == "cycle"]
    if not sweeps:
        raise SystemExit(f"error: {path} holds no finished unit sweep yet")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    # left: the training loss of every unit sweep (mean winning minibatch loss) over the time
    # spent searching, cycle ends marked
    t, clock, ends = [], 0.0, []
    for r in sweeps:
        clock += r["seconds"]
        t.append(clock / 60)
        if r.get("cycle_done"):
            ends.append(clock / 60)
    a1.plot(t, [r["mean_loss"] for r in sweeps], lw=1, marker=".", ms=3, label="unit sweep")
    for i, e in enumerate(ends):
        a1.axvline(e, color="grey", ls=":", lw=1, label="end of a cycle" if i == 0 else None)
    a1.set(xlabel="search time (min)", ylabel="mean minibatch cross-entropy",
           title="training loss per unit sweep")
    a1.legend()
    # right: accuracy after each cycle
    if cyc:
        x = [r["cycle"] for r in cyc]
        for key in ("val_acc", "test_acc"):
            if key in cyc[0]:
                a2.plot(x, [100 * r[key] for r in cyc], marker="o", label=key.split("_")[0])
        a2.legend()
    else:
        a2.text(0.5, 0.5, "no cycle finished yet", ha="center", va="center",
                transform=a2.transAxes)
    a2.xaxis.set_major_locator(MaxNLocator(integer=True))
    a2.set(xlabel="cycle", ylabel="accuracy (%)", title="accuracy after each cycle")
    fig.tight_layout()
    out = Path(args.output) if args.output else run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"train": train, "eval": evaluate_run, "plot": plot}[args.command](args)
    except (ValueError, TypeError, OSError, checkpoint.CheckpointError, NonFiniteLossError,
            memory.InsufficientMemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
