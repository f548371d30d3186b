"""DFO: a chosen subset of the parameters handed to a nevergrad optimizer through ask/tell.

nevergrad (``pip install nevergrad``) is an optional dependency, imported when the search starts.

The searched vector ``theta`` is the concatenation of the selected parameters (``params``, e.g.
``"bn"`` for every BatchNorm gamma/beta, ``"last"`` for the last conv/linear layer, ``"bn+last"``,
see :func:`rso_ext.methods.base.select_params`); the other parameters stay as they are. The
optimizer is ``nevergrad.optimizers.registry[optimizer]`` on an ``ng.p.Array`` initialised at the
model's values with mutation scale ``sigma``, budget ``cycles * generations * population`` and
``num_workers = population`` (``"CMA"`` and ``"DiagonalCMA"`` are built with CMA's own population
equal to ``population``, see :data:`CMA_POPSIZE_TIED`). One generation:

1. the minibatch: ``draw_batch`` (first ``batch_size`` entries of ``randperm(N)``);
2. ``population`` candidates asked, stacked into one ``[P, D]`` tensor and evaluated in one batched
   forward (the summed float64 loss, cross-entropy by default); each told its per-sample mean loss;
3. the optimizer's recommendation written into the model.

nevergrad's own random state is a numpy ``RandomState`` seeded once from the generator
(``randint(2**31 - 1)``, drawn when the search starts). The optimizer is checkpointed by pickling.
"""
from __future__ import annotations

import pickle
import warnings
from typing import Optional

import torch
from torch import nn

from ..checks import check_range
from ..contract import register
from ..losses import Loss
from .base import PopulationMethod


#: names built as ``ng.families.ParametrizedCMA(popsize=population, diagonal=...)``
CMA_POPSIZE_TIED = {"CMA": False, "DiagonalCMA": True}


def import_nevergrad():
    try:
        import nevergrad as ng
    except ImportError:
        raise ImportError("method 'dfo' needs nevergrad, an optional dependency: "
                          "pip install nevergrad") from None
    return ng


@register
class DFO(PopulationMethod):
    """Derivative-free optimisation of a parameter subset with nevergrad (ask/tell, batched).

    Args:
        params: the parameters to search (default ``"bn+last"``).
        optimizer: a name of ``nevergrad.optimizers.registry`` (default ``"CMA"``, full covariance,
            for up to a few hundred parameters; ``"DiagonalCMA"`` scales to many more).
        sigma: the initial mutation scale of the ``ng.p.Array``.
        population: candidates asked (and evaluated together) per generation.
        cycles, generations, batch_size, calib_size, generator, vectorize, loss: as for
            :class:`rso_ext.methods.EvolutionStrategy`.
    """

    method = "dfo"
    summary = "nevergrad optimiser (CMA by default) on a parameter subset (--params), ask/tell"

    def __init__(self, model: nn.Module, *, cycles: int = 10, generations: int = 50,
                 batch_size: int = 256, population: int = 20, params="bn+last",
                 optimizer: str = "CMA", sigma: float = 0.1, calib_size: int = 2000,
                 generator: Optional[torch.Generator] = None, vectorize: bool = True,
                 loss: Optional[Loss] = None) -> None:
        check_range("sigma", sigma, 0.0, lo_open=True)
        if not isinstance(optimizer, str):
            raise TypeError(f"optimizer must be a nevergrad optimizer name, got {optimizer!r}")
        super().__init__(model, cycles=cycles, generations=generations, batch_size=batch_size,
                         population=population, params=params, calib_size=calib_size,
                         generator=generator, vectorize=vectorize, loss=loss,
                         optimizer=optimizer, sigma=sigma)
        self.optimizer = None
        self._cands = None

    def _init_search(self) -> None:
        ng = import_nevergrad()
        import numpy as np
        h = self.hparams
        name = h["optimizer"]
        if name in CMA_POPSIZE_TIED:
            # CMA's population tied to ours: nevergrad's default popsize (4 + 3 ln D) differs
            # from num_workers for D >~ 300, and asking/telling batches that straddle CMA's
            # generations breaks its TPA step-size rule ("Mean shift samples are expected but
            # missing", facebookresearch/nevergrad#1690).
            family = ng.families.ParametrizedCMA(popsize=h["population"],
                                                 diagonal=CMA_POPSIZE_TIED[name])
        elif name in ng.optimizers.registry:
            family = ng.optimizers.registry[name]
        else:
            raise ValueError(f"optimizer={name!r} is not a nevergrad optimizer (see "
                             "nevergrad.optimizers.registry)")
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator))
        param = ng.p.Array(init=self.theta().double().cpu().numpy()).set_mutation(sigma=h["sigma"])
        param.random_state = np.random.RandomState(seed)
        self.optimizer = family(
            parametrization=param, budget=self.total_generations * h["population"],
            num_workers=h["population"])

    def _ask(self) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")         # cma's chatty TPA consistency warnings
            self._cands = [self.optimizer.ask() for _ in range(self.hparams["population"])]
        return torch.stack([torch.from_numpy(c.value) for c in self._cands]).to(
            self.device, self.param_dtype)

    def _tell(self, losses: torch.Tensor) -> None:
        """Each candidate told its loss per sample (``losses / batch_size``), then the
        optimizer's recommendation written into the model."""
        b = self.hparams["batch_size"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for c, loss in zip(self._cands, (losses / b).tolist()):
                self.optimizer.tell(c, loss)
            rec = self.optimizer.provide_recommendation().value
        self._cands = None
        self.write(torch.from_numpy(rec).to(self.device, self.param_dtype))

    def _search_state(self):
        return {"optimizer": pickle.dumps(self.optimizer)}

    def _load_search_state(self, state):
        import_nevergrad()
        self.optimizer = pickle.loads(state["optimizer"])


__all__ = ["DFO", "import_nevergrad"]
