"""Digest of seeded search runs: every decision count, loss and final weight, to compare builds.

A refactor that must not change behaviour (or two builds side by side) is checked by running
this script before and after and comparing the two JSON files: equal digests mean the same
decisions, the same losses to the last bit and the same final weights on this CPU.

    python tools/decisions_digest.py --out before.json
    ... change, rebuild ...
    python tools/decisions_digest.py --out after.json --compare before.json

The comparison takes the rows of the earlier file as the reference: every field they hold must
be equal in the new rows (fields the statistics gained since are not compared).

Each run trains ``paper_mnist`` from seed 0 on the embedded MNIST subset with a small pool
(one cycle of RSO on each backend; a few units of simulated annealing and lottery-ticket
search; a few generations of ES and GA). Floats are written with ``float.hex`` so equality is
bitwise. The digest depends on the CPU's instruction set and the torch build, so compare only
files made on the same machine and torch.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys

import torch

from rso_ext import data, models
from rso_ext.methods import METHODS

POOL = 1024


def _weights_sha(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _row(stats) -> dict:
    d = stats.as_dict()
    d.pop("seconds", None)
    return {k: (float(v).hex() if isinstance(v, float) else v) for k, v in d.items()}


def _run(method: str, x, y, limit, **kw) -> dict:
    gen = torch.Generator().manual_seed(0)
    model = models.get_model("paper_mnist", generator=gen)
    search = METHODS[method](model, generator=gen, **kw)
    rows = []
    for stats in search.run(x, y):
        rows.append(_row(stats))
        if len(rows) == limit or (limit is None and stats.cycle_done):
            break
    return {"rows": rows, "weights_sha256": _weights_sha(model)}


def digest() -> dict:
    torch.set_num_threads(2)
    s = data.load_splits("mnist", val_size=1000, seed=0)
    x, y = s.train_x[:POOL], s.train_y[:POOL]
    per_weight = dict(cycles=2, batch_size=64, calib_size=256)
    out = {"torch": torch.__version__}
    for backend in ("torch", "fused"):
        out[f"rso_{backend}"] = _run("rso", x, y, limit=None, backend=backend, **per_weight)
        out[f"sa_{backend}"] = _run("sa", x, y, limit=4, backend=backend, **per_weight)
        out[f"ticket_{backend}"] = _run("ticket", x, y, limit=4, backend=backend, **per_weight)
    for method in ("es", "ga"):
        out[method] = _run(method, x, y, limit=5, cycles=1, batch_size=64, calib_size=256)
    return out


def _same(old, new) -> bool:
    """Whether run ``new`` made the decisions of run ``old``: the same final weights, and rows
    equal on every field ``old`` has (a newer statistics type may add fields, never drop any)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return old == new
    if old.get("weights_sha256") != new.get("weights_sha256"):
        return False
    rows_old, rows_new = old.get("rows", []), new.get("rows", [])
    return len(rows_old) == len(rows_new) and all(
        all(k in b and b[k] == v for k, v in a.items()) for a, b in zip(rows_old, rows_new))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--compare", default=None, help="an earlier digest: exit 1 where they differ")
    args = ap.parse_args(argv)
    d = digest()
    with open(args.out, "w") as f:
        json.dump(d, f, indent=1)
    if args.compare:
        with open(args.compare) as f:
            old = json.load(f)
        bad = [k for k in sorted(set(old) | set(d)) if not _same(old.get(k), d.get(k))]
        if bad:
            print("digests differ in: " + ", ".join(bad))
            return 1
        print(f"digests equal ({len(d) - 1} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
