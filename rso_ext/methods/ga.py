"""Genetic algorithm over the whole network (truncation selection, elitism, Gaussian mutation;
the "deep GA" of Such et al. 2017 without crossover).

The population is a ``[P, D]`` tensor of flat parameter vectors on the model's device. It starts
as the model's parameters ``theta0`` (member 0) and ``P - 1`` mutants ``theta0 + sigma * randn``.
One generation:

1. the minibatch: ``draw_batch`` (first ``batch_size`` entries of ``randperm(N)``);
2. every member's summed float64 loss on it (cross-entropy by default), in one batched forward;
3. members sorted by loss (ties by index); the best one is written into the model;
4. the ``elite`` best members pass unchanged; the other ``P - elite`` slots are children: a parent
   drawn uniformly among the ``parents`` best (``randint``), plus ``sigma * randn(P - elite, D)``.

Draws, from the one CPU generator: the initial mutants' noise (first generation only), then per
generation the minibatch, the parent choices, the children's noise. The elites are re-evaluated on
every new minibatch. :class:`rso_ext.optim.GeneticAlgorithm` uses the same functions.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from ..checks import check_int, check_range
from ..contract import register
from ..losses import Loss
from .base import PopulationMethod


def initial_population(theta: torch.Tensor, population: int, sigma: float,
                       generator: torch.Generator) -> torch.Tensor:
    """``[population, D]``: ``theta`` and ``population - 1`` mutants of it."""
    noise = torch.randn(population - 1, len(theta), generator=generator)
    noise = noise.to(theta.device, theta.dtype)
    return torch.cat([theta.unsqueeze(0), theta.unsqueeze(0) + sigma * noise])


def next_generation(pop: torch.Tensor, losses: torch.Tensor, elite: int, parents: int,
                    sigma: float, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """The next population and the index (in ``pop``) of the best member of this one."""
    order = torch.argsort(losses.double().cpu(), stable=True)
    n_children = len(pop) - elite
    pick = order[torch.randint(0, parents, (n_children,), generator=generator)]
    noise = torch.randn(n_children, pop.shape[1], generator=generator).to(pop.device, pop.dtype)
    children = pop[pick.to(pop.device)] + sigma * noise
    return torch.cat([pop[order[:elite].to(pop.device)], children]), int(order[0])


def default_parents(population: int) -> int:
    """The truncation size when none is given: a fifth of the population (at least 1)."""
    return max(1, population // 5) if isinstance(population, int) else population


def check_ga(population: int, elite: int, parents: int, sigma: float) -> None:
    check_int("population", population, 2)
    check_int("elite", elite, 0, population, hi_open=True, hi_name=f"population={population}")
    check_int("parents", parents, 1, population, hi_name=f"population={population}")
    check_range("sigma", sigma, 0.0, lo_open=True)


class GAStrategy:
    """The GA as ask/tell on flat vectors, holding no model: :meth:`start` makes the first
    population from ``theta``; one generation is ``members = ask()``, then
    ``best = tell(losses)`` (the best member of the generation told, to write into the model).

    ``hparams`` is read at every call (``population``, ``elite``, ``parents``, ``sigma``):
    :class:`GeneticAlgorithm` passes its ``hparams``, :class:`rso_ext.optim.GeneticAlgorithm` its
    first param group. ``state["population"]`` is the ``[P, D]`` population; after :meth:`tell`,
    :attr:`best_index` is the best member's row in the population told."""

    def __init__(self, hparams: Mapping[str, Any], generator: torch.Generator,
                 state: Optional[Dict[str, Any]] = None) -> None:
        self.hparams, self.generator = hparams, generator
        self.state: Dict[str, Any] = {} if state is None else state
        self.best_index: Optional[int] = None

    @property
    def started(self) -> bool:
        return self.state.get("population") is not None

    def start(self, theta: torch.Tensor) -> None:
        """The first population: ``theta`` and mutants of it (draws their noise)."""
        h = self.hparams
        self.state["population"] = initial_population(theta, h["population"], h["sigma"],
                                                      self.generator)

    def ask(self) -> torch.Tensor:
        """The current population ``[P, D]``."""
        if not self.started:
            raise RuntimeError("GAStrategy.ask() before start(theta)")
        return self.state["population"]

    def tell(self, losses: torch.Tensor) -> torch.Tensor:
        """Select and mutate on the members' ``losses``; returns the best member told."""
        h = self.hparams
        pop = self.state["population"]
        new, best = next_generation(pop, losses, h["elite"], h["parents"], h["sigma"],
                                    self.generator)
        self.state["population"], self.best_index = new, best
        return pop[best]


@register
class GeneticAlgorithm(PopulationMethod):
    """Truncation-selection GA with elitism and Gaussian mutation over the selected parameters.

    Args:
        population: members per generation (>= 2); elite: best members kept unchanged
            (0 <= elite < population); parents: the truncation size (1..population; default
            ``population // 5``).
        sigma: mutation standard deviation (absolute, in weight units).
        cycles, generations, batch_size, params, calib_size, generator, vectorize, loss: as for
            :class:`rso_ext.methods.EvolutionStrategy`.

    ``ask()``/``tell(losses)``: :class:`GAStrategy` on the selected parameters.
    """

    method = "ga"
    summary = "genetic algorithm: truncation selection, elitism, Gaussian mutation"

    def __init__(self, model: nn.Module, *, cycles: int = 10, generations: int = 50,
                 batch_size: int = 256, population: int = 50, elite: int = 1,
                 parents: Optional[int] = None, sigma: float = 0.01, params="all",
                 calib_size: int = 2000,
                 generator: Optional[torch.Generator] = None, vectorize: bool = True,
                 loss: Optional[Loss] = None) -> None:
        parents = default_parents(population) if parents is None else parents
        check_ga(population, elite, parents, sigma)
        super().__init__(model, cycles=cycles, generations=generations, batch_size=batch_size,
                         population=population, params=params, calib_size=calib_size,
                         generator=generator, vectorize=vectorize, loss=loss,
                         elite=elite, parents=parents, sigma=sigma)
        self.strategy = GAStrategy(self.hparams, self.generator)

    @property
    def population(self) -> Optional[torch.Tensor]:
        """The current population ``[P, D]`` (None before the search starts)."""
        return self.strategy.state.get("population")

    def _init_search(self) -> None:
        self.strategy.start(self.theta())

    def _ask(self) -> torch.Tensor:
        return self.strategy.ask()

    def _tell(self, losses: torch.Tensor) -> None:
        self.write(self.strategy.tell(losses))

    def _search_state(self):
        return {"population": self.population.clone()}

    def _load_search_state(self, state):
        self.strategy.state = {"population": state["population"].to(self.device)}


__all__ = ["GeneticAlgorithm", "GAStrategy", "initial_population", "next_generation", "check_ga",
           "default_parents"]
