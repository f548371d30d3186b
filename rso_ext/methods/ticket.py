"""Lottery-ticket mask search without gradients: a good subnetwork of a randomly initialised net.

The weights of the conv/linear layers never move away from their initial values ``w_init``; what is
searched is a binary mask per weight, realised by writing ``w_init`` (kept) or ``0`` (pruned) into
the weight. Biases and BatchNorm parameters stay at their initial values and are not visited.

``init``: ``"model"`` takes the weights the model holds when the search starts as ``w_init``
(He-normal for :mod:`rso_ext.models`); ``"signed_constant"`` first replaces each weight by
``sign(w) * sqrt(2 / fan_in)`` (the "signed Kaiming constant" of Zhou et al. 2019 / Ramanujan et
al. 2020). The search starts from the dense network (every weight kept).

Visiting is RSO's (units in reverse layer order, out -> in -> ky -> kx, a fresh minibatch per
weight, BatchNorm in search mode). A visit evaluates K = 2 candidates with the backend's candidate
evaluator: the weight's current value and its flipped value (``{w_init, 0}`` in that order or the
reverse); the flip wins when its summed float64 loss is strictly lower (ties keep the current
mask).

**Target sparsity: a cap per sweep.** At cycle ``c`` a unit of ``n`` weights may keep at most
``cap_c = n - ceil(s_c * n)`` of them, with ``s_c = sparsity`` (``schedule="constant"``) or
``s_c = sparsity * (c + 1) / cycles`` (``schedule="linear"``, a gradual ramp). During the sweep a
pruned weight is not turned back on while the unit keeps ``cap_c`` weights. At the end of the sweep,
if the unit still keeps more than ``cap_c`` weights, the excess is pruned: the kept weights with
the lowest pruning cost ``L(pruned) - L(kept)`` as measured at their visit in this sweep (weights
not visited in this sweep rank last, ties by index). So after every whole sweep each unit holds
exactly its target sparsity or more, and the choice of what to prune is made by the measured
losses.
The excess is pruned at once (``set_many``: the fused backend rebuilds the layer's cache in one
pass instead of updating it per pruned weight). A sweep stopped inside the unit (``run(stop=)``)
does not prune: the unit is swept again from its first weight when the run goes on, so a run
that ends there keeps more than the cap in that unit.

Random streams: those of RSO (:mod:`rso_ext.streams`) with sigma = 0 (the deltas are drawn and not
used, the minibatches are); nothing else is drawn.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..checks import check_choice, check_range
from ..contract import Stats, register
from ..sweep import non_finite
from ..visit import MIXING, Unit
from .base import PerWeightMethod

SCHEDULES = ("constant", "linear")
INITS = ("model", "signed_constant")


def target_sparsity(sparsity: float, cycle: int, cycles: int, schedule: str) -> float:
    """The pruned fraction a unit must reach after a sweep at 0-based ``cycle``."""
    if schedule == "linear":
        return sparsity * min(1.0, (cycle + 1) / cycles)
    return sparsity


def kept_cap(n: int, target: float) -> int:
    """How many of ``n`` weights may stay kept at pruned fraction ``target``."""
    return n - math.ceil(target * n - 1e-9)


def signed_constant_(param: torch.Tensor) -> torch.Tensor:
    """Replace each entry by ``sign(w) * sqrt(2 / fan_in)`` (zeros count as positive)."""
    fan_in = param[0].numel() if param.dim() > 1 else 1
    c = math.sqrt(2.0 / fan_in)
    with torch.no_grad():
        param.copy_(torch.where(param < 0, -c, c).to(param.dtype))
    return param


@torch.no_grad()
def ticket_loop(unit: Unit, evaluator, y: Optional[torch.Tensor], k0: int, k1: int, streams,
                w_init: torch.Tensor, mask: torch.Tensor, cap: int, tick=None,
                cost: Optional[torch.Tensor] = None, prune: bool = True
                ) -> tuple[int, int, float]:
    """Visit weights ``k0 .. k1-1`` (shared by the class and optimizer forms), then prune the
    excess over ``cap``. ``w_init`` is the flat initial weight, ``mask`` the flat bool mask (CPU),
    updated in place. Returns (flips chosen by loss, forced prunes, sum of the kept losses).

    A sweep of the tensor may come in pieces (the optimizer form's bounded steps): pass the same
    ``cost`` (float64 [n], +inf where not visited; what pruning each kept weight would cost) to
    every piece and ``prune=False`` but for the last, and the pieces decide as one call over
    ``0 .. n-1`` does."""
    flat = unit.param.data.view(-1)
    dev = flat.device
    n = flat.numel()
    if cost is None:
        cost = torch.full((n,), math.inf, dtype=torch.float64)
    zero = torch.zeros((), dtype=flat.dtype, device=dev)
    kept = int(mask.sum())
    m = mask[k0:k1].tolist()
    flips, loss_sum, stopped = 0, 0.0, False
    for k in range(k0, k1):
        idx = streams.batch(k).to(dev)
        cur = m[k - k0]
        values = torch.stack([w_init[k], zero] if cur else [zero, w_init[k]])
        losses = evaluator.losses(k, values, idx, y[idx] if y is not None else None).tolist()
        if not math.isfinite(losses[0]):
            evaluator.set(k, values[0])
            mask[k0:k1] = torch.tensor(m, dtype=torch.bool)
            raise non_finite(unit, k, losses[0])
        flip = (math.isfinite(losses[1]) and losses[1] < losses[0] and (cur or kept < cap))
        j = 1 if flip else 0
        evaluator.set(k, values[j])
        if flip:
            m[k - k0] = not cur
            kept += -1 if cur else 1
            flips += 1
        if m[k - k0]:                   # kept after the visit: remember what pruning would cost
            cost[k] = (losses[1] - losses[0]) if cur else (losses[0] - losses[1])
        loss_sum += losses[j]
        if tick is not None and (k % 64 == 63 or k == k1 - 1) and tick(k + 1):
            stopped = k < k1 - 1        # asked to stop: k0 .. k visited, the rest as they were
            break
    mask[k0:k1] = torch.tensor(m, dtype=torch.bool)
    forced = 0
    if prune and not stopped and kept > cap:
        on = mask.nonzero().view(-1)
        drop = on[torch.argsort(cost[on], stable=True)[:kept - cap]]
        evaluator.set_many(drop, zero.expand(len(drop)))
        mask[drop] = False
        forced = len(drop)
    return flips, forced, loss_sum


#: the statistics of a ticket unit sweep (the one Stats, ``sparsity``, ``target`` and ``forced``
#: set; the old name, kept)
TicketStats = Stats


@register
class TicketFinder(PerWeightMethod):
    """Search a binary mask over ``model``'s conv/linear weights at their initial values.

    Args:
        model: an ``nn.Module`` of Conv2d/Linear/BatchNorm layers (as for :class:`rso_ext.RSO`).
        cycles: sweeps over every conv/linear weight.
        batch_size: minibatch size B per weight.
        sparsity: target fraction of pruned weights per layer, in [0, 1).
        schedule: ``"constant"`` (the target from the first sweep) or ``"linear"`` (ramped over the
            cycles), see the module documentation.
        init: ``"model"`` or ``"signed_constant"``.
        sampler, calib_size, generator, backend, pool_size, loss: as for :class:`rso_ext.RSO`
            (``backend`` defaults to ``"auto"``: fused when the model lowers).
    """

    method = "ticket"
    summary = "lottery-ticket mask search: each weight kept at its initial value or pruned"
    cli_options = {o: o for o in ("cycles", "batch_size", "calib_size", "sampler", "backend",
                                  "pool_size", "sparsity")}

    def __init__(self, model: nn.Module, *, cycles: int = 5, batch_size: int = 5000,
                 sparsity: float = 0.5, schedule: str = "constant", init: str = "model",
                 **kwargs: Any) -> None:
        bad = {"alpha", "weight_decay", "sigma", "sample_scale", "bn_sigma"} & set(kwargs)
        if bad:
            raise TypeError(f"TicketFinder does not take {sorted(bad)}: the weights stay at "
                            "their initial values")
        check_range("sparsity", sparsity, 0.0, 1.0, hi_open=True)
        check_choice("schedule", schedule, SCHEDULES)
        check_choice("init", init, INITS)
        super().__init__(model, cycles=cycles, batch_size=batch_size, weight_decay=0.0,
                         sample_scale=0.0, bn_sigma=0.0, **kwargs)
        self.hparams.update(sparsity=sparsity, schedule=schedule, init=init)
        self.w_init: Optional[Dict[str, torch.Tensor]] = None
        self.masks: Optional[Dict[str, torch.Tensor]] = None

    def _visits(self, unit: Unit) -> bool:
        return isinstance(unit.module, MIXING) and unit.param_name == "weight"

    def _prepare(self, x: torch.Tensor) -> None:
        super()._prepare(x)
        if self.w_init is None:
            if self.hparams["init"] == "signed_constant":
                for u in self.units:
                    signed_constant_(u.param.data)
            self.w_init = {u.name: u.param.detach().clone() for u in self.units}
            self.masks = {u.name: torch.ones(u.param.numel(), dtype=torch.bool)
                          for u in self.units}

    @property
    def target(self) -> float:
        h = self.hparams
        return target_sparsity(h["sparsity"], min(self.cycle, h["cycles"] - 1), h["cycles"],
                               h["schedule"])

    def _loop(self, unit, evaluator, y, k0, k1, streams, decay, tick):
        cap = kept_cap(unit.param.numel(), self.target)
        flips, self._forced, loss_sum = ticket_loop(
            unit, evaluator, y, k0, k1, streams, self.w_init[unit.name].view(-1),
            self.masks[unit.name], cap, tick)
        return flips, loss_sum

    def _sweep(self, index, x, y, progress, weights=None, sweeper=None) -> Stats:
        target = self.target
        stats = super()._sweep(index, x, y, progress, weights, sweeper)
        mask = self.masks[self.units[index].name]
        stats.sparsity = 1.0 - float(mask.double().mean())
        stats.target, stats.forced = target, self._forced
        return stats

    def sparsity(self) -> Dict[str, float]:
        """Pruned fraction per visited layer and ``"total"``."""
        if self.masks is None:
            return {}
        out = {k: 1.0 - float(m.double().mean()) for k, m in self.masks.items()}
        total = sum(int(m.numel()) for m in self.masks.values())
        out["total"] = 1.0 - sum(int(m.sum()) for m in self.masks.values()) / total
        return out

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["ticket"] = None if self.w_init is None else {
            "w_init": {k: v.clone() for k, v in self.w_init.items()},
            "masks": {k: v.clone() for k, v in self.masks.items()}}
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        t = state.get("ticket")
        if t is not None:
            dev = self.device
            self.w_init = {k: v.to(dev) for k, v in t["w_init"].items()}
            self.masks = {k: v.clone().cpu() for k, v in t["masks"].items()}


__all__ = ["TicketFinder", "TicketStats", "ticket_loop", "target_sparsity", "kept_cap",
           "signed_constant_", "SCHEDULES", "INITS"]
