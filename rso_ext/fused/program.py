"""The fused program as the lowerings emit it: the lowering of one module to one op
(:class:`Step`), the program of one unit's sweep (:class:`UnitProgram`) and :class:`PlanError`.

The encoding itself -- op kinds, unit kinds and :class:`rso_ext.ops.Program` -- is the compiled
operators' (csrc/core/program.h) and lives with their wrappers in :mod:`rso_ext.ops`.
:mod:`rso_ext.fused.lower_sequential` lowers an ``nn.Sequential`` child by child and
:mod:`rso_ext.fused.lower_graph` any other model through its ``torch.fx`` trace; both lower each
module with :func:`lower_module`, which refuses what the fused op set cannot run.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from ..ops import (AVGPOOL, BN, CONV, FLATTEN, GAP, LINEAR, MAXPOOL, RELU, UNIT_BETA, UNIT_BIAS,
                   UNIT_GAMMA, UNIT_WEIGHT, Program)
from ..visit import MIXING, NORM, Unit

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


def lower_module(name: str, m: nn.Module, shape: torch.Size, last: bool) -> Step:
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


def unit_kind(unit: Unit) -> int:
    """The ``unit_kind`` of the fused operators for ``unit``: weight or bias of a conv/linear
    layer, gamma or beta of a BatchNorm."""
    if isinstance(unit.module, MIXING):
        return UNIT_WEIGHT if unit.param_name == "weight" else UNIT_BIAS
    return UNIT_GAMMA if unit.param_name == "weight" else UNIT_BETA


@dataclass(frozen=True, eq=False)
class UnitProgram:
    """What the fused operators need to sweep one unit: ``program`` (op 0 the swept layer, the
    model's ``start``-th step, then the rest of the network up to the logits) and the swept
    parameter, ``unit_kind`` of op ``unit_op``.

    A traced graph's program (:mod:`rso_ext.fused.lower_graph`) also names ``x_node``, the node
    whose value over the pool is the layer's input ``X_d``, and ``sides``: (op, node) pairs,
    where ``program.tensors[4 * op]`` must be set to that node's value over the pool
    (:meth:`with_sides`) before the program runs."""

    program: Program
    unit_kind: int
    unit_op: int
    start: int
    x_node: Optional[int] = None
    sides: tuple[tuple[int, int], ...] = ()

    def with_sides(self, values: dict[int, torch.Tensor]) -> "UnitProgram":
        """This program with each side input set to ``values[node]``."""
        program = self.program
        for op, node in self.sides:
            program = program.with_tensor(4 * op, values[node])
        return dataclasses.replace(self, program=program)
