"""Accuracy and mean cross-entropy of a model on a labelled set, in chunks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1000) -> dict:
    """``{"acc": fraction correct, "loss": mean cross-entropy}`` with the model as it is (call
    :meth:`rso_ext.RSO.calibrate` first for BatchNorm nets)."""
    if len(x) == 0:
        raise ValueError("cannot evaluate on an empty set")
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    correct, loss = 0, 0.0
    for s in range(0, len(x), chunk):
        xb = x[s:s + chunk].to(dev, dtype)
        yb = y[s:s + chunk].to(dev)
        logits = model(xb)
        correct += int((logits.argmax(1) == yb).sum())
        loss += float(F.cross_entropy(logits.double(), yb, reduction="sum"))
    return {"acc": correct / len(x), "loss": loss / len(x)}
