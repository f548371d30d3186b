"""One unit's weights, one after another: draw the candidates, evaluate, choose, write.

``w' = w * (1 - weight_decay)``; candidates ``{w', w' + delta_k, w' - delta_k}`` (delta_k from the
sweep's streams); the lowest summed float64 loss wins, ties keep ``w'`` and non-finite candidates
are never chosen. A non-finite loss of ``w'`` itself stops the run (:class:`NonFiniteLossError`).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import nn

from .evaluate import BatchedCandidates, CachedInput, FullForward
from .memory import ModuleFootprint, torch_sweep_estimate
from .streams import SweepStreams
from .visit import Unit


class NonFiniteLossError(RuntimeError):
    """The loss of the current weights is NaN or infinite."""


def choose(losses: torch.Tensor) -> int:
    """Index of the lowest loss; ties keep the earliest candidate and non-finite candidates are
    never chosen. Candidate 0 is the current state."""
    vals = losses.tolist()
    best = 0
    for j in range(1, len(vals)):
        if math.isfinite(vals[j]) and vals[j] < vals[best]:
            best = j
    return best


def candidate_values(w: torch.Tensor, deltas: torch.Tensor, decay: float,
                     steps: Sequence[float] = (1.0,)) -> torch.Tensor:
    """[m, K] candidates of weights ``w`` [m]: ``w' = w * decay``, then ``w' + s * delta`` and
    ``w' - s * delta`` for each multiple ``s`` of ``steps`` (K = 1 + 2 * len(steps); the default
    is the paper's ``{w', w' + delta, w' - delta}``). Computed here once for every backend, so
    all of them try bit-identical values."""
    wd = w * decay
    cols = [wd]
    for s in steps:
        d = deltas * s          # exact for s = 1: the paper's candidates are unchanged
        cols += [wd + d, wd - d]
    return torch.stack(cols, dim=1)


def unravel(k: int, shape: torch.Size) -> tuple[int, ...]:
    """Multi-index of flat index ``k`` in row-major ``shape``."""
    out = []
    for s in reversed(shape):
        out.append(k % s)
        k //= s
    return tuple(out[::-1])


def non_finite(unit: Unit, k: int, loss: float) -> NonFiniteLossError:
    """The error for a non-finite loss of the current weights at weight ``k`` of ``unit``, naming
    the layer, the weight (flat and multi-index) and its neuron (output unit: the first index)."""
    index = unravel(k, unit.param.shape)
    return NonFiniteLossError(f"the loss of the current weights is {loss} at layer "
                              f"{unit.name!r}, weight {k} (index {index}) of neuron {index[0]}")


class Sweeper(Protocol):
    """The weight loop of one unit sweep, as every backend provides it.

    A sweeper may also state what it will take on the device, through a method
    ``memory_estimate(model, unit_module, pool_size, batch_size, trace) -> (bytes, description)``
    (``trace``: :func:`rso_ext.memory.trace_footprint` of the model); the driver checks it
    before the sweep starts (:func:`rso_ext.memory.sweep_estimate`)."""

    def begin(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Build the sweep's caches from the training pool ``(x, y)``."""

    def run(self, k0: int, k1: int, streams: SweepStreams, decay: float,
            tick: Optional[Callable[[int], Optional[bool]]] = None) -> tuple[int, float]:
        """Visit weights ``k0 .. k1-1``; returns (accepted moves, sum of winning losses).

        ``tick(k)`` is called every few weights with the end of the visited range (``k0 .. k-1``
        done); when it returns True the loop stops there and returns what it has."""

    def end(self) -> None:
        """Release the caches."""


class TorchSweeper:
    """The pure-PyTorch weight loop around a candidate evaluator (``backend="torch"``)."""

    def __init__(self, unit: Unit, evaluator: FullForward, candidates: int = 3) -> None:
        self.unit, self.evaluator = unit, evaluator
        self.candidates = candidates    # per weight (K), for the memory estimate

    def begin(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y
        self.evaluator.begin(self.unit, x)

    @torch.no_grad()
    def run(self, k0: int, k1: int, streams: SweepStreams, decay: float,
            tick: Optional[Callable[[int], Optional[bool]]] = None) -> tuple[int, float]:
        """Visit weights ``k0 .. k1-1``; returns (accepted moves, sum of winning losses)."""
        flat = self.unit.param.data.view(-1)
        deltas = streams.deltas[k0:k1].to(flat.device, flat.dtype)
        all_values = candidate_values(flat[k0:k1], deltas, decay, streams.steps)
        accepted, loss_sum = 0, 0.0
        for k in range(k0, k1):
            idx = streams.batch(k).to(self.x.device)
            values = all_values[k - k0]
            losses = self.evaluator.losses(k, values, idx, self.y[idx])
            if not math.isfinite(float(losses[0])):
                self.evaluator.set(k, values[0])
                raise non_finite(self.unit, k, float(losses[0]))
            j = choose(losses)
            self.evaluator.set(k, values[j])
            accepted += j != 0
            loss_sum += float(losses[j])
            if tick is not None and (k % 64 == 63 or k == k1 - 1) and tick(k + 1):
                break
        return accepted, loss_sum

    def end(self) -> None:
        self.evaluator.end()
        self.x = self.y = None

    def memory_estimate(self, model: nn.Module, unit_module: nn.Module, pool_size: int,
                        batch_size: int, trace: Sequence[ModuleFootprint]) -> tuple[int, str]:
        """(bytes, description) of this sweep on ``pool_size`` samples (see
        :func:`rso_ext.memory.torch_sweep_estimate`: the evaluator decides what is cached and
        how many candidates run at once)."""
        ev = getattr(self.evaluator, "inner", self.evaluator)    # a ShardedEvaluator's own
        return torch_sweep_estimate(trace, unit_module, pool_size, batch_size,
                                    cached=isinstance(ev, CachedInput),
                                    candidates=self.candidates,
                                    batched=isinstance(ev, BatchedCandidates))
