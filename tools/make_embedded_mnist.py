#!/usr/bin/env python3
"""Make the embedded MNIST subset: the first 10,000 training and first 2,000 test images/labels.

    python tools/make_embedded_mnist.py [SOURCE_DIR] [--out OUT_DIR]

SOURCE_DIR holds the four standard MNIST files (.gz or raw, flat or <dir>/MNIST/raw/); default: the
environment variable RSO_EXT_MNIST_ROOT. Output: OUT_DIR/MNIST/raw/*.gz (gzip level 9, mtime 0,
so the bytes are reproducible) and OUT_DIR/README.md. Default OUT_DIR: rso_ext/datasets/mnist_small.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from rso_ext.data import DATASETS, find_raw_file, load_mnist, read_idx, write_idx  # noqa: E402

N_TRAIN, N_TEST = 10_000, 2_000

README = """# Embedded MNIST subset

The first {n_train:,} training images/labels and the first {n_test:,} test images/labels of MNIST, in the
standard IDX format (gzip-compressed), laid out as torchvision does: `MNIST/raw/<file>.gz`.
`rso_ext.data.load_mnist()` / `load_splits()` use it when no `root` is given, so tests and examples
run without a download. For real results use the full set (`root=...`, `download=True`).

| file | shape |
| --- | --- |
{files}

Label counts per digit 0..9:

- train ({n_train:,}): {train_counts}
- test ({n_test:,}): {test_counts}

## Attribution and licence

MNIST is by Yann LeCun, Corinna Cortes and Christopher J. C. Burges
(http://yann.lecun.com/exdb/mnist/), distributed under the Creative Commons
Attribution-Share Alike 3.0 licence (CC BY-SA 3.0, https://creativecommons.org/licenses/by-sa/3.0/).
This subset is a derivative (the first images of each split, recompressed) and is shared under the
same licence.

## Regenerate

    python tools/make_embedded_mnist.py MNIST_DIR --out rso_ext/datasets/mnist_small

(the source folder holds the four original MNIST files; the output is byte-for-byte reproducible).
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", nargs="?", default=os.environ.get("RSO_EXT_MNIST_ROOT"),
                    help="folder with the full MNIST files (default: $RSO_EXT_MNIST_ROOT)")
    ap.add_argument("--out", default=str(REPO / "rso_ext" / "datasets" / "mnist_small"),
                    help="output folder (default: rso_ext/datasets/mnist_small)")
    args = ap.parse_args(argv)
    if not args.source:
        ap.error("name the folder with the full MNIST files (or set RSO_EXT_MNIST_ROOT)")
    src, out = Path(args.source), Path(args.out)
    raw = out / DATASETS["mnist"].folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)

    load_mnist(src, "mnist", train=True)  # validates the source files (counts, labels)
    load_mnist(src, "mnist", train=False)
    files = DATASETS["mnist"].files
    rows = []
    for role, stem in files.items():
        n = N_TRAIN if role.startswith("train") else N_TEST
        data = read_idx(find_raw_file(src, "mnist", stem))[:n].contiguous()
        write_idx(raw / (stem + ".gz"), data)
        rows.append(f"| `MNIST/raw/{stem}.gz` | {list(data.shape)} |")

    counts = {}
    for train in (True, False):
        _, y = load_mnist(out, "mnist", train=train)
        counts[train] = ", ".join(str(int(c)) for c in y.bincount(minlength=10))
    (out / "README.md").write_text(README.format(
        n_train=N_TRAIN, n_test=N_TEST, files="\n".join(rows),
        train_counts=counts[True], test_counts=counts[False]))
    total = sum(p.stat().st_size for p in raw.iterdir())
    print(f"wrote {raw} ({total} bytes of .gz) and {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
