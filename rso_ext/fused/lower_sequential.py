"""Lowering of an ``nn.Sequential`` model to the op list of the fused evaluation
(docs/design.md §4); other models (residual adds) are traced and lowered by :mod:`rso_ext.fused.lower_graph`.

Supported children: Conv2d (any kernel, stride, padding; groups=1, dilation 1, zero padding; bias
optional), Linear (bias optional), BatchNorm1d/2d (affine), ReLU, MaxPool2d and AvgPool2d (square
kernel, floor mode), AdaptiveAvgPool2d(1) (global average pool), Flatten, Dropout and Identity
(identity during search) and a final LogSoftmax (folded into the loss). Anything else is refused
with a :class:`PlanError` naming the module; ``backend="torch"`` runs any model.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops import BN, CONV, FLATTEN, LINEAR, Program
from ..visit import MIXING, Unit
from .program import PlanError, UnitProgram, lower_module, owning_layer, unit_kind


class Plan:
    """An ``nn.Sequential`` lowered child by child, with the fused program of each unit."""

    #: programs without Save/Load/Input/Add (GraphPlan's are "dag" programs)
    dag = False

    def __init__(self, model: nn.Module, sample: torch.Tensor) -> None:
        if not isinstance(model, nn.Sequential):
            raise PlanError(f"the fused backend lowers nn.Sequential models; "
                            f"{type(model).__name__} is not one (use backend='torch')")
        self.model = model
        children = list(model.named_children())
        shapes = []
        with torch.no_grad():
            h = sample
            was = model.training
            model.eval()
            try:
                for _, m in children:
                    shapes.append(h.shape)
                    h = m(h)
            finally:
                model.train(was)
        self.steps = [lower_module(n, m, s, i == len(children) - 1)
                      for i, ((n, m), s) in enumerate(zip(children, shapes))]
        # numbers per sample entering each child, then leaving the last one
        self.widths = [int(torch.Size(s[1:]).numel()) for s in shapes] + \
            [int(torch.Size(h.shape[1:]).numel())]
        self._check_channel_locality(shapes)

    def _check_channel_locality(self, shapes: list[torch.Size]) -> None:
        """A BatchNorm1d after a Flatten of a spatial map mixes nothing but normalises each pixel
        of a channel separately; the fused channel-local pass assumes one channel = one
        statistic, so refuse it."""
        flat_spatial = False
        for step, shape in zip(self.steps, shapes):
            if step.kind in (CONV, LINEAR):
                flat_spatial = False
            elif step.kind == FLATTEN:
                flat_spatial = len(shape) == 4 and shape[2] * shape[3] > 1
            elif step.kind == BN and flat_spatial:
                raise PlanError(f"module {step.name!r}: BatchNorm after flattening a spatial map "
                                "is not supported by the fused backend")

    def owner(self, unit: Unit) -> int:
        """Index of the conv/linear child whose output the unit changes."""
        idx = next((i for i, s in enumerate(self.steps) if s.module is unit.module), None)
        if idx is None:
            raise PlanError(f"unit {unit.name!r} does not belong to a direct child of the model")
        return owning_layer(self.steps, idx, unit)

    def stash_points(self, start: int) -> list[int]:
        """The conv/linear children before ``start`` whose inputs a cache build for ``start``
        should keep for their own unit sweeps later in the cycle (they come shallower, in
        reverse order): deepest first, as many as keep the caches alive at any later sweep
        (the kept inputs still ahead plus that layer's input and output) within the largest
        pair any one layer needs anyway."""
        w = self.widths
        mixing = [i for i, s in enumerate(self.steps) if s.kind in (CONV, LINEAR)]
        peak = max(w[d] + w[d + 1] for d in mixing)
        chosen: list[int] = []
        for d in reversed([i for i in mixing if i < start]):
            trial = chosen + [d]
            if all(sum(w[k] for k in trial if k < e) + w[e] + w[e + 1] <= peak
                   for e in mixing if e <= start):
                chosen = trial
        return chosen

    def forward_program(self, begin: int, stop: int) -> Program:
        """The program of :func:`rso_ext.ops.program_forward` for children ``begin .. stop-1``
        as they are now: a BatchNorm in eval mode with running statistics uses them, else
        batch ones."""
        kinds, params, eps, tensors = [], [], [], []
        for s in self.steps[begin:stop]:
            if s.kind is None:
                continue
            p = list(s.params)
            if s.kind == BN:
                m = s.module
                p[0] = int(m.training or m.running_mean is None)
            kinds.append(s.kind)
            params += p
            eps.append(s.eps)
            tensors += s.tensors()
        return Program(kinds, params, eps, tensors)

    def program(self, unit: Unit) -> UnitProgram:
        """The program of the fused ops for sweeping ``unit`` (live views of the
        parameters)."""
        start = self.owner(unit)
        steps = [s for s in self.steps[start:] if s.kind is not None]
        kinds, params, eps, tensors = [], [], [], []
        for s in steps:
            kinds.append(s.kind)
            params += s.params
            eps.append(s.eps)
            tensors += s.tensors()
        if isinstance(unit.module, MIXING):
            unit_op = 0
        else:
            unit_op = next(i for i, s in enumerate(steps) if s.module is unit.module)
            if any(s.kind in (CONV, LINEAR) for s in steps[1:unit_op]):
                raise PlanError(f"BatchNorm {unit.name!r} is not in the channel-local chain of "
                                "its layer")
            # a BatchNorm between the layer and the swept one runs before it: running
            # statistics, as rso_ext.batchnorm.search_mode sets them
            for i, s in enumerate(steps[1:unit_op], start=1):
                if s.kind == BN:
                    params[4 * i] = 0
        return UnitProgram(Program(kinds, params, eps, tensors), unit_kind(unit), unit_op, start)

