"""Lowering of an ``nn.Sequential`` model to the op list of the fused evaluation
(docs/design.md §4); other models (residual adds) are traced and lowered by
:mod:`rso_ext.plan_graph`.

Supported children: Conv2d (any kernel, stride, padding; groups=1, dilation 1, zero padding; bias
optional), Linear (bias optional), BatchNorm1d/2d (affine), ReLU, MaxPool2d and AvgPool2d (square
kernel, floor mode), AdaptiveAvgPool2d(1) (global average pool), Flatten, Dropout and Identity
(identity during search) and a final LogSoftmax (folded into the loss). Anything else is refused
with a :class:`PlanError` naming the module; ``backend="torch"`` runs any model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from .visit import MIXING, NORM, Unit

CONV, LINEAR, BN, RELU, AVGPOOL, MAXPOOL, GAP, FLATTEN = range(8)
SAVE, LOAD, INPUT, ADD = range(8, 12)      # residual networks (rso_ext/plan_graph.py)
UNIT_WEIGHT, UNIT_BIAS, UNIT_GAMMA, UNIT_BETA = range(4)
IDENTITY = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity)


class PlanError(TypeError):
    """The model cannot be lowered to the fused op set."""


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _square(name: str, m: nn.Module, attr: str) -> int:
    a, b = _pair(getattr(m, attr))
    if a != b:
        raise PlanError(f"module {name!r} ({type(m).__name__}): non-square {attr}={(a, b)} is not "
                        "supported by the fused backend")
    return a


@dataclass
class Step:
    """One child of the Sequential as the fused program sees it (``kind`` None: identity)."""

    name: str
    module: nn.Module
    kind: Optional[int]
    params: List[int] = field(default_factory=lambda: [0, 0, 0, 0])
    eps: float = 0.0

    def tensors(self) -> list[Optional[torch.Tensor]]:
        m = self.module
        if self.kind in (CONV, LINEAR):
            return [m.weight.data, None if m.bias is None else m.bias.data, None, None]
        if self.kind == BN:
            return [m.weight.data, m.bias.data, m.running_mean, m.running_var]
        return [None] * 4


def _lower_child(name: str, m: nn.Module, shape: torch.Size, last: bool) -> Step:
    if isinstance(m, nn.Conv2d):
        if m.groups != 1 or _pair(m.dilation) != (1, 1) or m.padding_mode != "zeros":
            raise PlanError(f"module {name!r} (Conv2d): groups={m.groups}, dilation={m.dilation}, "
                            f"padding_mode={m.padding_mode!r}; the fused backend supports "
                            "groups=1, dilation=1 and zero padding")
        if isinstance(m.padding, str):
            if m.padding != "valid":
                raise PlanError(f"module {name!r} (Conv2d): padding={m.padding!r} is not "
                                "supported by the fused backend; give the padding as numbers")
            pad = (0, 0)
        else:
            pad = _pair(m.padding)
        return Step(name, m, CONV, [*_pair(m.stride), *pad])
    if isinstance(m, nn.Linear):
        if len(shape) != 2:
            raise PlanError(f"module {name!r} (Linear) gets a {len(shape)}-D input; the fused "
                            "backend needs [batch, features] (add nn.Flatten before it)")
        return Step(name, m, LINEAR)
    if isinstance(m, NORM):
        if not m.affine:
            raise PlanError(f"module {name!r} ({type(m).__name__}): affine=False is not supported")
        if len(shape) not in (2, 4):
            raise PlanError(f"module {name!r} ({type(m).__name__}) gets a {len(shape)}-D input")
        return Step(name, m, BN, [1, 0, 0, 0], float(m.eps))
    if isinstance(m, nn.ReLU):
        return Step(name, m, RELU)
    if isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)):
        if m.ceil_mode:
            raise PlanError(f"module {name!r} ({type(m).__name__}): ceil_mode=True is not supported")
        if isinstance(m, nn.AvgPool2d) and (not m.count_include_pad or m.divisor_override):
            raise PlanError(f"module {name!r} (AvgPool2d): count_include_pad=False or "
                            "divisor_override is not supported")
        if isinstance(m, nn.MaxPool2d) and (_pair(m.dilation) != (1, 1) or m.return_indices):
            raise PlanError(f"module {name!r} (MaxPool2d): dilation or return_indices is not "
                            "supported")
        k = _square(name, m, "kernel_size")
        s = _square(name, m, "stride") if m.stride is not None else k
        return Step(name, m, AVGPOOL if isinstance(m, nn.AvgPool2d) else MAXPOOL,
                    [k, s, _square(name, m, "padding"), 0])
    if isinstance(m, nn.AdaptiveAvgPool2d) and _pair(m.output_size) == (1, 1):
        return Step(name, m, GAP)
    if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
        return Step(name, m, FLATTEN)
    if isinstance(m, IDENTITY):
        return Step(name, m, None)
    if isinstance(m, nn.LogSoftmax) and last and m.dim in (1, -1):
        return Step(name, m, None)      # cross-entropy of log-softmax == cross-entropy of logits
    raise PlanError(f"module {name!r} ({type(m).__name__}) is outside the fused op set (Conv2d, "
                    "Linear, BatchNorm, ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), "
                    "Flatten, Dropout); use backend='torch' for this model")


def owning_layer(steps: list, idx: int, unit: Unit) -> int:
    """Index of the conv/linear step whose output the unit of step ``idx`` changes: the step
    itself, or for a BatchNorm the last conv/linear before it."""
    if steps[idx].kind in (CONV, LINEAR):
        return idx
    owner = max((i for i in range(idx) if steps[i].kind in (CONV, LINEAR)), default=None)
    if owner is None:
        raise PlanError(f"BatchNorm {unit.name!r} runs before any conv/linear layer")
    return owner


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
        self.steps = [_lower_child(n, m, s, i == len(children) - 1)
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

    def forward_program(self, begin: int, stop: int) -> dict:
        """Arguments of ``rso_ext::program_forward`` for children ``begin .. stop-1`` as they
        are now: a BatchNorm in eval mode with running statistics uses them, else batch ones."""
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
        return dict(op_kinds=kinds, op_params=params, op_eps=eps, op_tensors=tensors)

    def program(self, unit: Unit) -> dict:
        """Arguments of the fused ops for sweeping ``unit`` (live views of the parameters)."""
        start = self.owner(unit)
        steps = [s for s in self.steps[start:] if s.kind is not None]
        kinds, params, eps, tensors = [], [], [], []
        for s in steps:
            kinds.append(s.kind)
            params += s.params
            eps.append(s.eps)
            tensors += s.tensors()
        if isinstance(unit.module, MIXING):
            unit_kind = UNIT_WEIGHT if unit.param_name == "weight" else UNIT_BIAS
            unit_op = 0
        else:
            unit_kind = UNIT_GAMMA if unit.param_name == "weight" else UNIT_BETA
            unit_op = next(i for i, s in enumerate(steps) if s.module is unit.module)
            if any(s.kind in (CONV, LINEAR) for s in steps[1:unit_op]):
                raise PlanError(f"BatchNorm {unit.name!r} is not in the channel-local chain of "
                                "its layer")
            # a BatchNorm between the layer and the swept one runs before it: running
            # statistics, as rso_ext.batchnorm.search_mode sets them
            for i, s in enumerate(steps[1:unit_op], start=1):
                if s.kind == BN:
                    params[4 * i] = 0
        return dict(start=start, op_kinds=kinds, op_params=params, op_eps=eps,
                    op_tensors=tensors, unit_kind=unit_kind, unit_op=unit_op)


def lower(model: nn.Module, sample: torch.Tensor):
    """Lower ``model`` for the fused backend or raise :class:`PlanError` naming the module:
    an ``nn.Sequential`` child by child (:class:`Plan`), any other module through its traced
    graph (:class:`rso_ext.plan_graph.GraphPlan`, residual adds)."""
    if isinstance(model, nn.Sequential):
        return Plan(model, sample)
    from .plan_graph import GraphPlan
    return GraphPlan(model, sample)
