"""Evolution strategy (OpenAI-ES style) over the whole network, or a subset of its parameters.

One generation, with ``theta`` the flat vector of the searched parameters (``D`` entries):

1. the minibatch: ``draw_batch`` = the first ``batch_size`` entries of ``randperm(N)``;
2. the noise: ``eps = randn(population // 2, D)`` (float32), mirrored: members are
   ``theta + sigma * eps_i`` for ``eps_1 .. eps_h, -eps_1 .. -eps_h`` (antithetic sampling);
3. the members' summed float64 cross-entropies on the minibatch, all in one batched forward;
4. rank-based fitness shaping: centred ranks, ``u_i = (P - 1 - rank_i) / (P - 1) - 1/2`` with
   rank 0 for the lowest loss (ties by member index), so ``sum u_i = 0``;
5. ``g = sum_i u_i eps_i / (P * sigma)`` (an estimate of minus the gradient of the smoothed loss)
   and an ascent step on ``g``: Adam (default) or plain SGD, with decoupled weight decay
   ``theta -= lr * weight_decay * theta``.

Draws 1 and 2 come from the one CPU generator in that order, on the CPU, then move to the model's
device; the weights never leave torch. :class:`rso_ext.optim.EvolutionStrategy` uses the same
functions, so on the same seed both forms reach the same weights.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from ..checks import check_choice, check_range
from ..contract import register
from ..losses import Loss
from .base import PopulationMethod

OPTIMIZERS = ("adam", "sgd")


def check_es(population: int, sigma: float, lr: float, weight_decay: float,
             optimizer: str) -> None:
    """Refuse ES hyperparameters out of range, naming the argument."""
    if not isinstance(population, int) or population < 2 or population % 2:
        raise ValueError(f"population must be an even int >= 2 (antithetic pairs), got "
                         f"{population!r}")
    check_range("sigma", sigma, 0.0, lo_open=True)
    check_range("lr", lr, 0.0, lo_open=True)
    check_range("weight_decay", weight_decay, 0.0, 1.0, hi_open=True)
    check_choice("optimizer", optimizer, OPTIMIZERS)


def draw_noise(generator: torch.Generator, population: int, dim: int) -> torch.Tensor:
    """[population, dim] antithetic noise: ``h = population // 2`` normal rows, then their
    negatives."""
    half = torch.randn(population // 2, dim, generator=generator)
    return torch.cat([half, -half])


def centered_ranks(losses: torch.Tensor) -> torch.Tensor:
    """float32 utilities in [-1/2, 1/2]: the lowest loss gets 1/2, the highest -1/2; ties are
    ranked by index (stable)."""
    p = len(losses)
    order = torch.argsort(losses.double().cpu(), stable=True)
    rank = torch.empty(p, dtype=torch.float32)
    rank[order] = torch.arange(p, dtype=torch.float32)
    return (p - 1 - rank) / max(1, p - 1) - 0.5


def es_direction(eps: torch.Tensor, losses: torch.Tensor, sigma: float) -> torch.Tensor:
    """``sum_i u_i eps_i / (P sigma)`` with the centred-rank utilities of ``losses``."""
    u = centered_ranks(losses).to(eps.device, eps.dtype)
    return (u @ eps) / (len(u) * sigma)


def es_update(theta: torch.Tensor, direction: torch.Tensor, state: Dict[str, Any], lr: float,
              weight_decay: float, optimizer: str = "adam", betas=(0.9, 0.999),
              eps: float = 1e-8) -> torch.Tensor:
    """The new ``theta`` after one ascent step on ``direction``; ``state`` (Adam's moments and
    step count) is updated in place."""
    if optimizer == "adam":
        t = state["t"] = state.get("t", 0) + 1
        m = state.setdefault("m", torch.zeros_like(theta))
        v = state.setdefault("v", torch.zeros_like(theta))
        m.mul_(betas[0]).add_(direction, alpha=1 - betas[0])
        v.mul_(betas[1]).addcmul_(direction, direction, value=1 - betas[1])
        mhat = m / (1 - betas[0] ** t)
        vhat = v / (1 - betas[1] ** t)
        step = mhat / (vhat.sqrt() + eps)
    else:
        step = direction
    return theta * (1 - lr * weight_decay) + lr * step


class ESStrategy:
    """The ES as ask/tell on a flat vector, holding no model: one generation is
    ``members = ask(theta)`` (draws the noise), then ``new_theta = tell(losses)``.

    ``hparams`` is read at every call (``population``, ``sigma``, ``lr``, ``weight_decay``,
    ``optimizer``): :class:`EvolutionStrategy` passes its ``hparams``,
    :class:`rso_ext.optim.EvolutionStrategy` its first param group. ``state`` holds Adam's
    moments and step count (updated in place by :meth:`tell`)."""

    def __init__(self, hparams: Mapping[str, Any], generator: torch.Generator,
                 state: Optional[Dict[str, Any]] = None) -> None:
        self.hparams, self.generator = hparams, generator
        self.state: Dict[str, Any] = {} if state is None else state
        self._asked: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def ask(self, theta: torch.Tensor) -> torch.Tensor:
        """``[population, D]``: ``theta + sigma * eps`` for antithetic noise ``eps``."""
        h = self.hparams
        eps = draw_noise(self.generator, h["population"], len(theta)).to(theta.device, theta.dtype)
        self._asked = (theta, eps)
        return theta + h["sigma"] * eps

    def tell(self, losses: torch.Tensor) -> torch.Tensor:
        """The new ``theta`` after the step on the members' ``losses`` (lower is better)."""
        if self._asked is None:
            raise RuntimeError("ESStrategy.tell() without ask()")
        (theta, eps), self._asked = self._asked, None
        h = self.hparams
        d = es_direction(eps, losses, h["sigma"])
        return es_update(theta, d, self.state, h["lr"], h["weight_decay"], h["optimizer"])


@register
class EvolutionStrategy(PopulationMethod):
    """Antithetic ES with rank-based fitness shaping over the selected parameters.

    Args:
        model: any ``nn.Module`` returning logits ``[batch, classes]`` (``torch.func.vmap``-able
            unless ``vectorize=False``).
        cycles, generations: the run is ``cycles x generations`` generations; a cycle is the unit
            of evaluation and logging (as an RSO cycle).
        batch_size: minibatch per generation, shared by all members.
        population: members per generation (even, >= 2).
        sigma: standard deviation of the perturbations (absolute, in weight units).
        lr: step size; ``optimizer``: ``"adam"`` or ``"sgd"``; ``weight_decay``: decoupled.
        params: which parameters to search (see :func:`rso_ext.methods.base.select_params`).
        calib_size, generator, loss: as for :class:`rso_ext.RSO`.

    ``ask()``/``tell(losses)``: :class:`ESStrategy` on the selected parameters.
    """

    method = "es"
    summary = "evolution strategy: antithetic, rank-shaped, Adam steps on the whole network"
    cli_options = {**PopulationMethod.cli_options, "lr": "lr"}

    def __init__(self, model: nn.Module, *, cycles: int = 10, generations: int = 50,
                 batch_size: int = 256, population: int = 50, sigma: float = 0.02,
                 lr: float = 0.01, optimizer: str = "adam", weight_decay: float = 0.0,
                 params="all", calib_size: int = 2000,
                 generator: Optional[torch.Generator] = None, vectorize: bool = True,
                 loss: Optional[Loss] = None) -> None:
        check_es(population, sigma, lr, weight_decay, optimizer)
        super().__init__(model, cycles=cycles, generations=generations, batch_size=batch_size,
                         population=population, params=params, calib_size=calib_size,
                         generator=generator, vectorize=vectorize, loss=loss, sigma=sigma,
                         lr=lr, optimizer=optimizer, weight_decay=weight_decay)
        self.strategy = ESStrategy(self.hparams, self.generator)

    @property
    def opt_state(self) -> Dict[str, Any]:
        """Adam's moments and step count."""
        return self.strategy.state

    def _init_search(self) -> None:
        self.strategy.state = {}

    def _ask(self) -> torch.Tensor:
        return self.strategy.ask(self.theta())

    def _tell(self, losses: torch.Tensor) -> None:
        self.write(self.strategy.tell(losses))

    def _search_state(self):
        return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in self.opt_state.items()}

    def _load_search_state(self, state):
        dev = self.device
        self.strategy.state = {k: (v.to(dev) if torch.is_tensor(v) else v)
                               for k, v in state.items()}


__all__ = ["EvolutionStrategy", "ESStrategy", "draw_noise", "centered_ranks", "es_direction",
           "es_update", "OPTIMIZERS"]
