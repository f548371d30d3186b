"""The gradient-free family behind RSO's interface.

| name     | class form (here)           | optimizer form (rso_ext.optim) | one step              | searches                                       |
| -------- | --------------------------- | ------------------------------ | --------------------- | ---------------------------------------------- |
| `rso`    | :class:`rso_ext.RSO`        | `RandomSearch` (alias `RSO`)   | a unit sweep          | each weight: {w', w'+d, w'-d}, lowest loss     |
| `sa`     | :class:`SimulatedAnnealing` | `SimulatedAnnealing`           | a unit sweep          | each weight: {w', w'+d}, Metropolis acceptance |
| `ticket` | :class:`TicketFinder`       | `TicketFinder`                 | a unit sweep          | a keep/prune mask over the initial weights     |
| `es`     | :class:`EvolutionStrategy`  | `EvolutionStrategy`            | a generation          | whole network, antithetic ES, rank shaping     |
| `ga`     | :class:`GeneticAlgorithm`   | `GeneticAlgorithm`             | a generation          | whole network, elitism + mutation              |
| `dfo`    | :class:`DFO`                | (none)                         | a generation          | a parameter subset through nevergrad           |

A name means the same method in both forms: the same decision code runs (the per-weight loops
:class:`rso_ext.sweep.TorchSweeper`, :func:`sa.sa_loop`, :func:`ticket.ticket_loop`; the
population methods' ask/tell :class:`es.ESStrategy`, :class:`ga.GAStrategy`) and, on the same
seed, the random draws come in the same order (see :mod:`rso_ext.optim`). Each optimizer class
names its method in ``method``.

Every class form follows the one contract of :mod:`rso_ext.contract` (:class:`Method`): built from
a model, a loss (``loss=``, :mod:`rso_ext.losses`; summed cross-entropy by default) and
hyperparameters; ``step(x, y)`` runs one unit sweep (per-weight methods) or one generation
(population methods) and returns a :class:`Stats`; ``run(x, y)`` yields one per step;
``state_dict()`` / ``load_state_dict()``; ``check(x, y)``; ``calibrate(x)`` before evaluation.
Population methods add ``ask()`` / ``tell(losses)`` (:class:`PopulationMethod`).

Each class declares its registry entry (``method``, ``summary``, ``cli_options``); :data:`METHODS`
(name -> class, in the order above) and :func:`from_config` are what the command line reads.
"""
from __future__ import annotations

from ..contract import METHODS, Method, Stats, from_config, method_help, takers
# the classes register in import order, which is the order of the table above
from ..rso import RSO
from .base import (BatchedLoss, GenerationStats, PerWeightMethod, PopulationMethod,  # noqa: I001
                   select_params)
from .sa import SimulatedAnnealing
from .ticket import TicketFinder
from .es import EvolutionStrategy
from .ga import GeneticAlgorithm
from .dfo import DFO

__all__ = ["METHODS", "from_config", "method_help", "takers", "Method", "Stats", "RSO", "SimulatedAnnealing",
           "TicketFinder", "EvolutionStrategy", "GeneticAlgorithm", "DFO", "PerWeightMethod",
           "PopulationMethod", "BatchedLoss", "GenerationStats", "select_params"]
