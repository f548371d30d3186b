"""The gradient-free family behind RSO's interface.

| name     | class                       | searches                                       |
| -------- | --------------------------- | ---------------------------------------------- |
| `rso`    | :class:`rso_ext.RSO`        | each weight: {w', w'+d, w'-d}, lowest loss     |
| `sa`     | :class:`SimulatedAnnealing` | each weight: {w', w'+d}, Metropolis acceptance |
| `ticket` | :class:`TicketFinder`       | a keep/prune mask over the initial weights     |
| `es`     | :class:`EvolutionStrategy`  | whole network, antithetic ES, rank shaping     |
| `ga`     | :class:`GeneticAlgorithm`   | whole network, elitism + mutation              |
| `dfo`    | :class:`DFO`                | a parameter subset through nevergrad           |

Every class is built from a model and hyperparameters, runs on tensors or a Dataset/DataLoader
(``run(x, y)`` yields statistics), round-trips ``state_dict()`` and offers ``calibrate(x)`` before
evaluation. The ``torch.optim``-style forms are in :mod:`rso_ext.optim`.
"""
from __future__ import annotations

from typing import Dict, Type

from ..rso import RSO
from .base import BatchedLoss, GenerationStats, PerWeightMethod, PopulationMethod, select_params
from .dfo import DFO
from .es import EvolutionStrategy
from .ga import GeneticAlgorithm
from .sa import SimulatedAnnealing
from .ticket import TicketFinder

METHODS: Dict[str, Type] = {
    "rso": RSO,
    "sa": SimulatedAnnealing,
    "ticket": TicketFinder,
    "es": EvolutionStrategy,
    "ga": GeneticAlgorithm,
    "dfo": DFO,
}

__all__ = ["METHODS", "from_config", "SimulatedAnnealing", "TicketFinder", "EvolutionStrategy",
           "GeneticAlgorithm", "DFO", "PerWeightMethod", "PopulationMethod", "BatchedLoss",
           "GenerationStats", "select_params"]


def from_config(cfg: dict, model, generator):
    """The search object of a CLI run configuration (``python -m rso_ext train --method ...``).

    ``cfg`` holds the train options; method options left at ``None`` take the class defaults."""
    method = cfg.get("method") or "rso"
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")

    def opt(**pairs):
        return {k: v for k, v in pairs.items() if v is not None}

    common = dict(cycles=cfg["cycles"], batch_size=cfg["batch_size"],
                  calib_size=cfg["calib_size"], generator=generator)
    per_weight = opt(backend=cfg.get("backend"), pool_size=cfg.get("pool_size"))
    if method in ("rso", "sa"):
        kw = dict(common, alpha=cfg["alpha"], weight_decay=cfg["weight_decay"],
                  sampler=cfg["sampler"], sigma=cfg["sigma"], sample_scale=cfg["sample_scale"],
                  **per_weight)
        if method == "sa":
            kw.update(opt(t0=cfg.get("temperature")))
        return METHODS[method](model, **kw)
    if method == "ticket":
        return TicketFinder(model, **common, sampler=cfg["sampler"], **per_weight,
                            **opt(sparsity=cfg.get("sparsity")))
    kw = dict(common, **opt(generations=cfg.get("generations"), population=cfg.get("population"),
                            sigma=cfg.get("noise"), params=cfg.get("params")))
    if method == "es":
        kw.update(opt(lr=cfg.get("lr")))
    return METHODS[method](model, **kw)
