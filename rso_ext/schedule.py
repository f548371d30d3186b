"""Step sizes: sigma per visited parameter and its linear annealing over cycles
(docs/design.md §1)."""
from __future__ import annotations

import math

import torch
from torch import nn

BN_SIGMA = 0.167
SIGMA_MODES = ("he", "empirical")


def base_sigma(module: nn.Module, param_name: str, param: torch.Tensor, mode: str = "he",
               sample_scale: float = 1.0, bn_sigma: float = BN_SIGMA) -> float:
    """sigma_d of one parameter before annealing.

    conv/linear weights (and their biases): ``sqrt(2 / fan_in) * sample_scale`` for ``mode="he"``,
    or the standard deviation of the weight tensor as it is now for ``mode="empirical"``
    (Algorithm 1 of the paper; call this right after init). BatchNorm gamma and beta: ``bn_sigma``.
    """
    if mode not in SIGMA_MODES:
        raise ValueError(f"sigma must be one of {SIGMA_MODES}, got {mode!r}")
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return float(bn_sigma)
    weight = module.weight
    if mode == "empirical" and weight.numel() > 1:
        return float(weight.detach().double().std()) * sample_scale
    fan_in = weight[0].numel()
    return math.sqrt(2.0 / fan_in) * sample_scale


def annealed(sigma: float, cycle: int, cycles: int, alpha: float) -> float:
    """sigma at 0-based ``cycle`` of ``cycles``: ``sigma * (alpha + (1 - alpha) * (C - c) / C)``."""
    if cycles < 1:
        raise ValueError(f"cycles must be >= 1, got {cycles}")
    if not 0 <= cycle < cycles:
        raise ValueError(f"cycle must be in [0, {cycles}), got {cycle}")
    return sigma * (alpha + (1.0 - alpha) * (cycles - cycle) / cycles)
