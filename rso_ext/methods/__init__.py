"""The gradient-free family behind RSO's interface.

| name     | class form           | rso_ext.optim form      | step   | searches                           |
| -------- | -------------------- | ----------------------- | ------ | ---------------------------------- |
| `rso`    | `rso_ext.RSO`        | `RandomSearch` (`RSO`)  | sweep  | each weight: {w', w'+d, w'-d}      |
| `sa`     | `SimulatedAnnealing` | `SimulatedAnnealing`    | sweep  | each weight {w', w'+d}, Metropolis |
| `ticket` | `TicketFinder`       | `TicketFinder`          | sweep  | keep/prune mask on initial weights |
| `es`     | `EvolutionStrategy`  | `EvolutionStrategy`     | gener. | whole network, antithetic ES       |
| `ga`     | `GeneticAlgorithm`   | `GeneticAlgorithm`      | gener. | whole network, elitism + mutation  |
| `dfo`    | `DFO`                | (none)                  | gener. | a parameter subset, nevergrad      |

(a step: "sweep" is one unit sweep, every weight of one parameter tensor; "gener." one
generation.)

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

__all__ = ["METHODS", "from_config", "method_help", "takers", "Method", "Stats", "RSO",
           "SimulatedAnnealing", "TicketFinder", "EvolutionStrategy", "GeneticAlgorithm", "DFO",
           "PerWeightMethod", "PopulationMethod", "BatchedLoss", "GenerationStats", "select_params"]
