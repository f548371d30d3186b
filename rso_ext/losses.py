"""The loss a search minimises (``loss=`` of every class form of :mod:`rso_ext.methods`).

**The signature.** A loss is a callable ``loss(logits, target) -> losses``:

* ``logits``: ``[K, B, C]`` floating-point tensor: the model's outputs for ``K`` candidates
  (the candidate values of one weight for a per-weight method, the members of a population for a
  population method) on the same ``B`` samples;
* ``target``: ``[B]`` int64 tensor of class indices (the labels of those samples), on the same
  device;
* returns a float64 tensor ``[K]``: each candidate's loss **summed** over the ``B`` samples (the
  statistics divide by ``B``); lower is better. It must not depend on anything but its
  arguments, or the decisions stop being reproducible.

The default, :func:`cross_entropy`, is the compiled summed float64 softmax cross-entropy
(:func:`rso_ext.ops.candidate_cross_entropy`). The fused backend computes exactly that loss
inside its kernels, so a per-weight method given another loss runs on the pure-PyTorch backend
(``backend="auto"`` says so in ``backend_reason``; ``backend="fused"`` refuses it). :func:`summed`
turns a per-sample loss such as ``F.multi_margin_loss(..., reduction="none")`` into one.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from . import ops

#: ``loss(logits [K, B, C], target [B]) -> float64 [K]`` (summed over the batch)
Loss = Callable[[Tensor, Tensor], Tensor]

__all__ = ["Loss", "cross_entropy", "summed", "is_cross_entropy", "describe", "check_loss",
           "resolve"]


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Summed softmax cross-entropy of each candidate, float64 ``[K]`` (the default loss; see
    :func:`rso_ext.ops.candidate_cross_entropy`)."""
    return ops.candidate_cross_entropy(logits, target)


def summed(per_sample: Callable[[Tensor, Tensor], Tensor], name: Optional[str] = None) -> Loss:
    """The loss of the contract from a per-sample loss ``per_sample(logits [N, C], target [N])
    -> [N]`` (e.g. ``lambda z, t: F.multi_margin_loss(z, t, reduction="none")``): the ``K``
    candidates' logits flattened into one batch (upcast to float64), the result summed per
    candidate in float64."""
    def loss(logits: Tensor, target: Tensor) -> Tensor:
        k, b = logits.shape[:2]
        flat = logits.reshape(k * b, *logits.shape[2:]).to(torch.float64)
        return per_sample(flat, target.repeat(k)).to(torch.float64).view(k, b).sum(1)
    loss.__name__ = loss.__qualname__ = name or getattr(per_sample, "__name__", "loss")
    return loss


def is_cross_entropy(loss: Optional[Loss]) -> bool:
    """Whether ``loss`` is the default (None, :func:`cross_entropy` or the compiled op itself)."""
    return loss is None or loss is cross_entropy or loss is ops.candidate_cross_entropy


def describe(loss: Any) -> str:
    """A name for ``loss`` in messages and checkpoints (``module.qualname`` when it has one)."""
    name = getattr(loss, "__qualname__", None) or type(loss).__name__
    module = getattr(loss, "__module__", None)
    return f"{module}.{name}" if module and module != "builtins" else name


def check_loss(loss: Any) -> None:
    """TypeError unless ``loss`` is None (the default) or a callable."""
    if loss is not None and not callable(loss):
        raise TypeError("loss must be a callable loss(logits [K, B, C], target [B]) -> float64 "
                        f"[K] (see rso_ext.losses), got {type(loss).__name__}")


def resolve(loss: Optional[Loss]) -> Loss:
    """The callable to use: ``loss``, or :func:`cross_entropy` for None."""
    return cross_entropy if loss is None else loss
