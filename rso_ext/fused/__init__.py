"""``backend="fused"``: the compiled fused evaluation of unit sweeps (docs/design.md §2, §4).

A model is lowered to fused programs (csrc/core/program.h) by :func:`lower`: an ``nn.Sequential``
child by child (:class:`Plan`, :mod:`.lower_sequential`), any other module through its
``torch.fx`` trace (:class:`GraphPlan`, :mod:`.lower_graph`, residual adds); both lower each
module to one op of :mod:`.program`, or raise :class:`PlanError` naming it. A
:class:`FusedSweeper` (:mod:`.sweeper`) runs one unit's sweep on a plan through the compiled ops,
with the caches of consecutive sweeps kept in a :class:`CacheStore`.

Imports point one way: ``program`` <- ``lower_sequential``, ``lower_graph`` <- ``sweeper``.
"""
from __future__ import annotations

import torch
from torch import nn

from .lower_graph import GraphPlan
from .lower_sequential import Plan
from .program import PlanError
from .sweeper import CacheStore, FusedSweeper

__all__ = ["lower", "Plan", "GraphPlan", "PlanError", "FusedSweeper", "CacheStore"]


def lower(model: nn.Module, sample: torch.Tensor) -> Plan | GraphPlan:
    """Lower ``model`` for the fused backend or raise :class:`PlanError` naming the module:
    an ``nn.Sequential`` child by child (:class:`Plan`), any other module through its traced
    graph (:class:`GraphPlan`, residual adds)."""
    if isinstance(model, nn.Sequential):
        return Plan(model, sample)
    return GraphPlan(model, sample)
