"""BatchNorm during search and for evaluation (docs/design.md §1).

During the sweep of a parameter owned by module ``m``:

* every BatchNorm that runs **before** ``m`` uses running statistics recomputed on the fixed
  calibration set at the start of the sweep (these layers do not change during the sweep, so this
  is what makes the per-sample input cache of layer ``m`` exact);
* ``m``'s own BatchNorm and every later one use the statistics of the minibatch (train mode, no
  running statistics touched);
* everything else (Dropout, ...) is in eval mode.

For evaluation the running statistics are recomputed on the calibration set, then eval mode.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .visit import NORM


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, NORM) for m in model.modules())


@torch.no_grad()
def calibrate(model: nn.Module, x_calib: torch.Tensor) -> nn.Module:
    """Recompute every BatchNorm's running mean/var on ``x_calib`` in one pass (the statistics of
    each layer are those of the whole calibration batch), then leave the model in eval mode."""
    # BatchNorms built with track_running_stats=False keep no buffers and always use batch statistics.
    bns = [m for m in model.modules() if isinstance(m, NORM) and m.running_mean is not None]
    if bns:
        saved = [(m.momentum, m.track_running_stats) for m in bns]
        model.eval()
        for m in bns:
            m.track_running_stats = True
            m.reset_running_stats()
            m.momentum = None          # cumulative average: one batch -> exactly its statistics
            m.train()
        try:
            model(x_calib)
        finally:
            for m, (momentum, track) in zip(bns, saved):
                m.momentum = momentum
                m.track_running_stats = track
    return model.eval()


@contextlib.contextmanager
def search_mode(model: nn.Module, order: list[nn.Module], position: int) -> Iterator[None]:
    """Modes for sweeping a parameter of the module at ``position`` of the execution ``order``."""
    was_training = {m: (m.training, getattr(m, "track_running_stats", None))
                    for m in model.modules()}
    pos = {id(m): i for i, m in enumerate(order)}
    try:
        model.eval()
        for m in model.modules():
            if isinstance(m, NORM) and pos.get(id(m), -1) >= position:
                m.train()
                m.track_running_stats = False   # batch statistics, running buffers untouched
        yield
    finally:
        for m, (training, track) in was_training.items():
            m.train(training)
            if track is not None:
                m.track_running_stats = track
