"""What the driver visits, and in which order (docs/design.md §1).

The visiting units are the parameters of conv/linear/BatchNorm modules. Modules are taken in
**reverse execution order**, each conv/linear followed by the BatchNorm layers that run after it and
before the next conv/linear ("FC, conv6, beta6, gamma6, conv5, beta5, gamma5, ..."). Inside a unit
the weights are visited in row-major order: out -> in -> ky -> kx for a conv, out -> in for a linear.
A conv/linear is visited weight first, then bias; a BatchNorm beta first, then gamma.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
from torch import nn

MIXING = (nn.Conv2d, nn.Linear)
NORM = (nn.BatchNorm1d, nn.BatchNorm2d)
SUPPORTED = MIXING + NORM


@dataclass
class Unit:
    """One parameter tensor swept as a whole: ``module_name.param_name``."""

    module_name: str
    param_name: str
    module: nn.Module
    position: int          # index of the module in execution order

    @property
    def name(self) -> str:
        return f"{self.module_name}.{self.param_name}" if self.module_name else self.param_name

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.param_name)


def execution_order(model: nn.Module, sample: torch.Tensor) -> List[tuple[str, nn.Module]]:
    """Leaf modules in the order ``model(sample)`` first calls them."""
    order: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    names = {id(m): n for n, m in model.named_modules()}
    hooks = []

    def hook(mod: nn.Module, _inp) -> None:
        if id(mod) not in seen:
            seen.add(id(mod))
            order.append((names[id(mod)], mod))

    for _, m in model.named_modules():
        if not list(m.children()):
            hooks.append(m.register_forward_pre_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(sample)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return order


def check_supported(model: nn.Module) -> None:
    """Refuse modules with parameters that RSO does not know how to visit, naming the module."""
    for name, m in model.named_modules():
        own = [n for n, _ in m.named_parameters(recurse=False)]
        if own and not isinstance(m, SUPPORTED):
            raise TypeError(
                f"unsupported module {name or '<root>'!r} ({type(m).__name__}) holds parameters "
                f"{own}: RSO visits the parameters of Conv2d, Linear and BatchNorm1d/2d only")
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise TypeError(f"unsupported module {name!r}: Conv2d with groups={m.groups} "
                            "(only groups=1 is supported)")


def visit_units(model: nn.Module, sample: torch.Tensor) -> List[Unit]:
    """The units of ``model`` in visiting order; ``sample`` is a small input batch used to trace
    the execution order once."""
    check_supported(model)
    order = [(n, m, i) for i, (n, m) in enumerate(execution_order(model, sample))]
    groups: list[list[tuple[str, nn.Module, int]]] = []
    for name, m, pos in order:
        if isinstance(m, MIXING):
            groups.append([(name, m, pos)])
        elif isinstance(m, NORM):
            if not groups:
                raise TypeError(f"BatchNorm {name!r} runs before any conv/linear layer; "
                                "RSO expects every BatchNorm to follow one")
            groups[-1].append((name, m, pos))
    units: list[Unit] = []
    for group in reversed(groups):
        for name, m, pos in group:
            params = ["weight", "bias"] if isinstance(m, MIXING) else ["bias", "weight"]
            for p in params:
                if getattr(m, p, None) is not None:
                    units.append(Unit(name, p, m, pos))
    if not units:
        raise TypeError("the model has no Conv2d/Linear/BatchNorm parameters to train")
    return units
