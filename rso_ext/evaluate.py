"""Candidate evaluation in pure PyTorch (``backend="torch"``): the reference every faster path is
checked against.

For one weight, the K candidate values are written into the parameter one after another and the
network is run on the weight's minibatch; the K logit sets go to the compiled summed float64
cross-entropy op. Two evaluators compute the same losses:

* :class:`FullForward` runs the whole model per candidate (any ``nn.Module``);
* :class:`CachedInput` (``nn.Sequential`` models whose visited module is a direct child) caches the
  input of that module for the whole pool once per sweep and runs only the suffix per candidate,
  as the authors do. The cache is exact because every layer before the swept one is fixed during
  the sweep, BatchNorm included (see :mod:`rso_ext.batchnorm`).
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops
from .visit import Unit


class FullForward:
    """Whole-model forward per candidate."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def begin(self, unit: Unit, x: torch.Tensor) -> None:
        self.unit, self.x = unit, x

    def inputs(self, idx: torch.Tensor) -> torch.Tensor:
        return self.x[idx]

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return self.model(inp)

    @torch.no_grad()
    def losses(self, k: int, values: torch.Tensor, idx: torch.Tensor,
               target: torch.Tensor) -> torch.Tensor:
        """float64 [K]: summed cross-entropy on minibatch ``idx`` with weight ``k`` of the unit set
        to each of ``values``. The weight is left at the last value: the caller writes the winner
        with :meth:`set`."""
        flat = self.unit.param.data.view(-1)
        inp = self.inputs(idx)
        logits = []
        for v in values:
            flat[k] = v
            logits.append(self.forward(inp))
        return ops.candidate_cross_entropy(torch.stack(logits), target)

    def set(self, k: int, value: torch.Tensor) -> None:
        """Write ``value`` as weight ``k`` of the unit (and keep any cache in step)."""
        self.unit.param.data.view(-1)[k] = value

    def end(self) -> None:
        self.x = None


class CachedInput(FullForward):
    """Suffix forward from the cached input of the swept module (``nn.Sequential`` only)."""

    def __init__(self, model: nn.Sequential, chunk: int = 1000) -> None:
        super().__init__(model)
        self.children = list(model.children())
        self.chunk = chunk

    @staticmethod
    def supports(model: nn.Module, unit: Unit) -> bool:
        return isinstance(model, nn.Sequential) and any(c is unit.module for c in model.children())

    @torch.no_grad()
    def begin(self, unit: Unit, x: torch.Tensor) -> None:
        self.unit = unit
        i = next(j for j, c in enumerate(self.children) if c is unit.module)
        prefix = nn.Sequential(*self.children[:i])
        self.suffix = nn.Sequential(*self.children[i:])
        self.x = torch.cat([prefix(x[s:s + self.chunk]) for s in range(0, len(x), self.chunk)])

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return self.suffix(inp)


def make_evaluator(model: nn.Module, unit: Unit) -> FullForward:
    """The cheapest exact torch evaluator for sweeping ``unit``."""
    return CachedInput(model) if CachedInput.supports(model, unit) else FullForward(model)
