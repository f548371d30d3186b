"""Simulated annealing with RSO's per-weight visiting.

Every weight of every unit is visited as in RSO (same units, order, sigma and its annealing, weight
decay, minibatch per weight). A visit evaluates K = 2 candidates on the weight's minibatch with the
backend's candidate evaluator: ``w' = w * (1 - weight_decay)`` and one proposal ``w' + delta``.
With ``dL = (L(w' + delta) - L(w')) / B`` (the per-sample mean of the summed float64
cross-entropies), the proposal is accepted when ``dL < 0``, or when ``T > 0`` and
``u < exp(-dL / T)`` (Metropolis); otherwise the weight keeps ``w'``. A non-finite proposal is
never accepted; a non-finite ``L(w')`` stops the run (:class:`rso_ext.NonFiniteLossError`).

Temperature (per-sample loss units), constant within a cycle: ``schedule="exp"`` goes
geometrically from ``t0`` at cycle 0 to ``t_final`` at the last cycle,
``T_c = t0 * (t_final / t0) ** (c / (C - 1))``; ``schedule="linear"`` linearly.

Random streams of one unit sweep, drawn from the one generator in this order:

1. the RSO streams of :mod:`rso_ext.streams` (the deltas, then the minibatch permutation or seed);
2. ``u = torch.rand(n, dtype=float64)``: the acceptance uniforms, entry k for the k-th weight,
   drawn right after the streams (for every weight of the unit, whether or not it is visited).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..checks import check_choice, check_range
from ..contract import Stats, register
from ..rso import RSO
from ..sweep import non_finite
from ..visit import Unit
from .base import PerWeightMethod

SCHEDULES = ("exp", "linear")


def temperature(t0: float, t_final: float, cycle: int, cycles: int, schedule: str = "exp") -> float:
    """The temperature at 0-based ``cycle`` of ``cycles``."""
    f = cycle / (cycles - 1) if cycles > 1 else 0.0
    if schedule == "linear" or t0 == 0.0 or t_final == 0.0:
        return t0 + (t_final - t0) * f
    return t0 * (t_final / t0) ** f


def accept(d_loss: float, u: float, temp: float) -> bool:
    """Metropolis: improvements always, a worse proposal with probability exp(-dL / T)."""
    if not math.isfinite(d_loss):
        return False
    if d_loss < 0:
        return True
    return temp > 0 and u < math.exp(-d_loss / temp)


@torch.no_grad()
def sa_loop(unit: Unit, evaluator, y: torch.Tensor, k0: int, k1: int, streams, decay: float,
            uniforms: torch.Tensor, temp: float, tick=None) -> tuple[int, float]:
    """Visit weights ``k0 .. k1-1`` of ``unit`` (shared by the class and optimizer forms);
    returns (accepted proposals, sum of the kept summed losses)."""
    flat = unit.param.data.view(-1)
    dev = flat.device
    deltas = streams.deltas[k0:k1].to(dev, flat.dtype)
    w = flat[k0:k1] * decay
    cands = torch.stack([w, w + deltas], dim=1)          # [m, 2]
    u = uniforms[k0:k1].tolist()
    accepted, loss_sum = 0, 0.0
    for k in range(k0, k1):
        idx = streams.batch(k).to(dev)
        values = cands[k - k0]
        losses = evaluator.losses(k, values, idx, y[idx] if y is not None else None).tolist()
        if not math.isfinite(losses[0]):
            evaluator.set(k, values[0])
            raise non_finite(unit, k, losses[0])
        j = 1 if accept((losses[1] - losses[0]) / len(idx), u[k - k0], temp) else 0
        evaluator.set(k, values[j])
        accepted += j
        loss_sum += losses[j]
        if tick is not None and (k % 64 == 63 or k == k1 - 1) and tick(k + 1):
            break                       # asked to stop: k0 .. k visited
    return accepted, loss_sum


#: the statistics of an SA unit sweep (the one Stats, ``temperature`` set; the old name, kept)
SAStats = Stats


@register
class SimulatedAnnealing(PerWeightMethod):
    """Simulated annealing of ``model``'s conv/linear/BatchNorm parameters, one weight at a time.

    Args (besides those of :class:`rso_ext.RSO`, which keep their meaning and defaults):
        t0: temperature at the first cycle, in per-sample loss units (>= 0).
        t_final: temperature at the last cycle (>= 0; 0 with ``schedule="linear"`` ends greedy).
        schedule: ``"exp"`` (geometric) or ``"linear"``.
        backend: candidate evaluator, any backend of :class:`RSO` (default ``"auto"``: fused when the model lowers).
    """

    method = "sa"
    summary = "simulated annealing: each weight tries w'+d, Metropolis acceptance"
    cli_options = {**{o: a for o, a in RSO.cli_options.items() if o != "candidate_steps"},
                   "temperature": "t0"}

    def __init__(self, model: nn.Module, *, t0: float = 1e-3, t_final: float = 1e-5,
                 schedule: str = "exp", **kwargs: Any) -> None:
        check_range("t0", t0, 0.0)
        check_range("t_final", t_final, 0.0)
        check_choice("schedule", schedule, SCHEDULES)
        if schedule == "exp" and (t0 == 0) != (t_final == 0):
            raise ValueError("schedule='exp' needs t0 and t_final both > 0 (or both 0); "
                             f"got t0={t0}, t_final={t_final}")
        super().__init__(model, **kwargs)
        self.hparams.update(t0=t0, t_final=t_final, schedule=schedule)

    @property
    def temperature(self) -> float:
        h = self.hparams
        return temperature(h["t0"], h["t_final"], min(self.cycle, h["cycles"] - 1), h["cycles"],
                           h["schedule"])

    def sweeper(self, unit: Unit):
        sw = super().sweeper(unit)
        # drawn right after the unit's streams (the driver calls sweeper() next; see module doc)
        self._uniforms = torch.rand(unit.param.numel(), generator=self.generator,
                                    dtype=torch.float64)
        return sw

    def _loop(self, unit, evaluator, y, k0, k1, streams, decay, tick):
        return sa_loop(unit, evaluator, y, k0, k1, streams, decay, self._uniforms,
                       self.temperature, tick)

    def _sweep(self, index, x, y, progress, weights=None, sweeper=None) -> Stats:
        temp = self.temperature
        stats = super()._sweep(index, x, y, progress, weights, sweeper)
        stats.temperature = temp
        return stats


__all__ = ["SimulatedAnnealing", "SAStats", "sa_loop", "accept", "temperature", "SCHEDULES"]
