#!/usr/bin/env python
"""RSO on the paper's MNIST network through the class API (what ``python -m rso_ext train`` runs,
without the run folder): data, model, search, evaluation, and a state to resume from.

    python examples/rso_paper_mnist.py                              # embedded subset, B=128
    python examples/rso_paper_mnist.py --data-root MNIST_DIR --batch-size 5000 --cycles 50
"""
from __future__ import annotations

import argparse

import torch

from rso_ext import RSO, data, metrics, models


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=None, help="MNIST folder (default: the embedded subset)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--cycles", type=int, default=2)
    p.add_argument("--train-size", type=int, default=None, help="first N training images only")
    p.add_argument("--max-units", type=int, default=0, help="stop after N unit sweeps (0: all)")
    p.add_argument("--save", default=None, help="write the search state here at the end")
    args = p.parse_args(argv)

    splits = data.load_splits("mnist", root=args.data_root, val_size=1000)
    x, y = splits.train_x[:args.train_size], splits.train_y[:args.train_size]
    gen = torch.Generator().manual_seed(0)
    model = models.paper_mnist(generator=gen)             # He-initialised, as in the paper
    rso = RSO(model, cycles=args.cycles, batch_size=args.batch_size, generator=gen)

    for n, st in enumerate(rso.run(x, y), 1):              # one unit sweep per item, last layer first
        print(f"cycle {st.cycle + 1} {st.layer:>13}: {st.accepted}/{st.weights} moved, "
              f"mean loss {st.mean_loss:.4f}, sigma {st.sigma:.4f}, {st.seconds:.1f} s")
        if st.cycle_done or n == args.max_units:
            rso.calibrate(x)                               # BatchNorm statistics for evaluation
            val = metrics.evaluate(model, splits.val_x, splits.val_y)
            test = metrics.evaluate(model, splits.test_x, splits.test_y)
            print(f"  validation accuracy {100 * val['acc']:.2f} %, "
                  f"test accuracy {100 * test['acc']:.2f} % ({rso.backend})")
        if n == args.max_units:
            break
    if args.save:
        torch.save(rso.state_dict(), args.save)           # RSO(...).load_state_dict resumes it
    return test["acc"]


if __name__ == "__main__":
    main()
