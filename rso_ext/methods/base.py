"""Machinery shared by the gradient-free methods other than RSO.

Two families:

* **per-weight methods** (:class:`PerWeightMethod`: simulated annealing, lottery-ticket mask search)
  are :class:`rso_ext.RSO` with another decision rule. They inherit the whole driver: units and
  visiting order, random streams drawn up front per unit sweep, BatchNorm calibration and search
  mode, pool subsampling, the backend's candidate evaluator (``backend="torch"`` or ``"fused"``:
  whatever ``RSO.sweeper(unit)`` returns, used through its ``losses``/``set`` interface), position
  and checkpoints. Only the weight loop differs: :class:`MethodSweeper` wraps the backend's
  sweeper and runs the method's own loop over its candidates.
* **population methods** (:class:`PopulationMethod`: evolution strategy, genetic algorithm, DFO)
  search a flat vector of (a subset of) the parameters. A population ``[P, D]`` is evaluated on one
  minibatch in one batched forward (:class:`BatchedLoss`: ``torch.func.functional_call`` + ``vmap``
  over the stacked parameters, on the model's device), with every BatchNorm on the statistics of
  the minibatch and Dropout off, as during an RSO sweep.

Both families take the BatchNorm calibration images without consuming the generator: the
``calib_size`` training images at evenly spaced positions (:func:`spread_indices`). That keeps the
generator's sequence equal to the one the ``rso_ext.optim`` forms draw, so class and optimizer
forms make the same decisions on the same seed.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from .. import batchnorm, ops
from ..checks import check_choice, check_generator, check_int, check_model, check_range  # noqa: F401
from ..data import check_data, from_dataset
from ..rso import RSO, _progress
from ..sweep import Sweeper
from ..visit import MIXING, NORM, Unit, execution_order

STATE_FORMAT = 1
ParamSpec = Union[str, Sequence[str], Callable[[str], bool]]


def spread_indices(pool: int, count: int) -> torch.Tensor:
    """``min(count, pool)`` indices evenly spaced over ``range(pool)`` (no randomness used)."""
    n = min(count, pool)
    return torch.arange(n, dtype=torch.int64) * pool // n


def draw_batch(generator: torch.Generator, pool: int, batch_size: int) -> torch.Tensor:
    """The minibatch of one generation/step: the first ``batch_size`` entries of a permutation of
    ``range(pool)`` drawn from ``generator`` (int64, CPU)."""
    return torch.randperm(pool, generator=generator)[:batch_size]


# -- per-weight methods ---------------------------------------------------------------------------
class MethodSweeper:
    """A :class:`rso_ext.sweep.Sweeper` running a method's own weight loop on the candidate
    evaluator of the backend's sweeper (``losses(k, values, idx, target)`` / ``set(k, value)``)."""

    def __init__(self, inner: Sweeper, unit: Unit, loop: Callable[..., tuple[int, float]]) -> None:
        self.inner, self.unit, self.loop = inner, unit, loop
        ev = inner if hasattr(inner, "losses") else getattr(inner, "evaluator", None)
        if ev is None or not hasattr(ev, "set"):
            raise TypeError(f"the backend's sweeper {type(inner).__name__} offers no per-weight "
                            "candidate evaluator (losses/set)")
        self.evaluator = ev
        self.y: Optional[torch.Tensor] = None

    def begin(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.inner.begin(x, y)
        self.y = y

    def run(self, k0: int, k1: int, streams, decay: float,
            tick: Optional[Callable[[int], None]] = None) -> tuple[int, float]:
        return self.loop(self.unit, self.evaluator, self.y, k0, k1, streams, decay, tick)

    def end(self) -> None:
        self.inner.end()
        self.y = None


class PerWeightMethod(RSO):
    """RSO's driver with another per-weight decision rule (subclasses set :attr:`method` and
    implement :meth:`_loop`, called once per unit sweep with the sweep's streams)."""

    method = ""

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.hparams["method"] = self.method

    def _prepare(self, x: torch.Tensor) -> None:
        if self.calib_idx is None:
            self.calib_idx = spread_indices(len(x), self.hparams["calib_size"])
        fresh = self.units is None
        super()._prepare(x)
        if fresh:
            keep = [i for i, u in enumerate(self.units) if self._visits(u)]
            if not keep:
                raise TypeError(f"{type(self).__name__}: the model has no parameter this method "
                                "visits")
            self.units = [self.units[i] for i in keep]
            if len(self.sigma0) != len(self.units):
                self.sigma0 = [self.sigma0[i] for i in keep]

    def _visits(self, unit: Unit) -> bool:
        return True

    def sweeper(self, unit: Unit) -> Sweeper:
        """The backend's sweeper for ``unit`` with this method's weight loop. Called by the driver
        right after the unit's streams are drawn, so draws made here follow them."""
        return MethodSweeper(super().sweeper(unit), unit, self._loop)

    def _loop(self, unit: Unit, evaluator, y: torch.Tensor, k0: int, k1: int, streams,
              decay: float, tick) -> tuple[int, float]:
        raise NotImplementedError

    def sweep_unit(self, index: int, x, y=None, *, weights=None, sweeper=None, progress=False):
        if sweeper is not None:
            raise TypeError(f"{type(self).__name__}.sweep_unit runs its own weight loop; "
                            "choose the evaluator with backend= instead of sweeper=")
        return super().sweep_unit(index, x, y, weights=weights, progress=progress)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        saved = state.get("hparams", {}).get("method", "rso")
        if saved != self.method:
            raise ValueError(f"the checkpoint was made by method {saved!r}, not {self.method!r}")
        super().load_state_dict(state)


# -- population methods ----------------------------------------------------------------------------
def select_params(model: nn.Module, spec: ParamSpec, sample: torch.Tensor) -> list[str]:
    """Names (in ``named_parameters`` order) of the parameters ``spec`` selects:

    * ``"all"``; ``"bn"`` (every BatchNorm parameter); ``"last"`` (the parameters of the last
      conv/linear layer in execution order); several joined by ``+`` (``"bn+last"``);
    * a sequence of parameter names or module-name prefixes (``["fc", "bn6.weight"]``);
    * a callable ``name -> bool``.
    """
    named = [n for n, _ in model.named_parameters()]
    if callable(spec):
        chosen = {n for n in named if spec(n)}
    elif isinstance(spec, str):
        chosen = set()
        for part in spec.split("+"):
            if part == "all":
                chosen |= set(named)
            elif part == "bn":
                chosen |= {f"{mn}.{pn}" if mn else pn for mn, m in model.named_modules()
                           if isinstance(m, NORM) for pn, _ in m.named_parameters(recurse=False)}
            elif part == "last":
                mix = [(n, m) for n, m in execution_order(model, sample) if isinstance(m, MIXING)]
                if not mix:
                    raise ValueError("params='last': the model has no conv/linear layer")
                mn, m = mix[-1]
                chosen |= {f"{mn}.{pn}" if mn else pn
                           for pn, _ in m.named_parameters(recurse=False)}
            else:
                raise ValueError(f"params={spec!r}: unknown part {part!r}; use 'all', 'bn', "
                                 "'last' (joined by '+'), a list of names/prefixes or a callable")
    else:
        prefixes = list(spec)
        chosen = {n for n in named for p in prefixes if n == p or n.startswith(p + ".")}
        unknown = [p for p in prefixes if not any(n == p or n.startswith(p + ".") for n in named)]
        if unknown:
            raise ValueError(f"params: no parameter is named or prefixed {unknown}")
    names = [n for n in named if n in chosen]
    if not names:
        raise ValueError(f"params={spec!r} selects no parameter of the model")
    return names


class BatchedLoss:
    """Summed float64 cross-entropy of a population of flat parameter vectors on one minibatch.

    ``loss(thetas [P, D], x [B, ...], y [B]) -> float64 [P]``: member ``i`` is the model with the
    selected parameters (``names``, concatenated in that order) set to ``thetas[i]`` and every other
    parameter as it is. One ``vmap`` of ``functional_call`` over the population (in chunks of at
    most ``max_samples`` member-samples), every BatchNorm on its member's minibatch statistics.
    ``vectorize=False`` loops over the members instead (for models ``vmap`` cannot run)."""

    def __init__(self, model: nn.Module, names: Sequence[str], order: Sequence[nn.Module],
                 max_samples: int = 16384, vectorize: bool = True) -> None:
        params = dict(model.named_parameters())
        self.model, self.names, self.order = model, list(names), list(order)
        self.shapes = [params[n].shape for n in self.names]
        self.numels = [params[n].numel() for n in self.names]
        self.max_samples, self.vectorize = max_samples, vectorize

    @property
    def dim(self) -> int:
        return sum(self.numels)

    def unflatten(self, theta: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, theta.split(self.numels), self.shapes)}

    @torch.no_grad()
    def __call__(self, thetas: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call, vmap

        def forward(theta: torch.Tensor) -> torch.Tensor:
            return functional_call(self.model, self.unflatten(theta), (x,))

        chunk = max(1, self.max_samples // max(1, len(x)))
        out = []
        with batchnorm.search_mode(self.model, self.order, 0):
            for s in range(0, len(thetas), chunk):
                part = thetas[s:s + chunk]
                if self.vectorize:
                    logits = vmap(forward)(part)
                else:
                    logits = torch.stack([forward(t) for t in part])
                out.append(ops.candidate_cross_entropy(logits, y))
        return torch.cat(out)


@dataclass
class GenerationStats:
    """What one generation of a population method did."""

    cycle: int              # 0-based
    generation: int         # 0-based, counted over the whole run
    evaluations: int        # sample-forward evaluations so far (members x minibatch size)
    mean_loss: float        # mean over the population of the summed loss / batch size
    best_loss: float        # lowest member loss / batch size
    sigma: float            # perturbation scale used
    seconds: float
    cycle_done: bool        # last generation of the cycle

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


class PopulationMethod:
    """Driver of a whole-network population search: ``cycles`` x ``generations`` generations, one
    fresh minibatch of ``batch_size`` training samples per generation (:func:`draw_batch`), the
    model holding the method's current solution after every generation.

    The interface is :class:`rso_ext.RSO`'s: ``run(x, y)`` yields a :class:`GenerationStats` per
    generation, ``state_dict()``/``load_state_dict()`` resume exactly, ``calibrate(x)`` prepares
    the model for evaluation, ``cycle``/``unit`` (generation within the cycle) give the position.
    Subclasses implement :meth:`_init_search`, :meth:`_generation`, :meth:`_search_state`."""

    method = ""

    def __init__(self, model: nn.Module, *, cycles: int, generations: int, batch_size: int,
                 population: int, params: ParamSpec = "all", calib_size: int = 2000,
                 generator: Optional[torch.Generator] = None, vectorize: bool = True,
                 **hparams: Any) -> None:
        check_model(model)
        for name, v in (("cycles", cycles), ("generations", generations),
                        ("batch_size", batch_size), ("population", population),
                        ("calib_size", calib_size)):
            check_int(name, v, 1)
        check_generator(generator)
        if not (callable(params) or isinstance(params, (str, list, tuple))):
            raise TypeError(f"params must be a string, a list of names or a callable, got "
                            f"{type(params).__name__}")
        self.model = model
        self.params_spec = params
        self.hparams = dict(method=self.method, cycles=cycles, generations=generations,
                            batch_size=batch_size, population=population,
                            params=params if isinstance(params, str) else
                            (list(params) if not callable(params) else "<callable>"),
                            calib_size=calib_size, vectorize=vectorize, **hparams)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.generation = 0
        self.evaluations = 0
        self.calib_idx: Optional[torch.Tensor] = None
        self.names: Optional[list[str]] = None
        self.loss: Optional[BatchedLoss] = None
        self._initialised = False

    # -- position -------------------------------------------------------------------------------
    @property
    def cycle(self) -> int:
        return self.generation // self.hparams["generations"]

    @property
    def unit(self) -> int:
        return self.generation % self.hparams["generations"]

    @property
    def total_generations(self) -> int:
        return self.hparams["cycles"] * self.hparams["generations"]

    @property
    def done(self) -> bool:
        return self.generation >= self.total_generations

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def param_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- data and set-up ---------------------------------------------------------------------------
    def _data(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        if y is None:
            x, y = from_dataset(x)
        with torch.no_grad():
            was = self.model.training
            try:
                out = self.model.eval()(x[:2].to(self.device, self.param_dtype))
            finally:
                self.model.train(was)
        if out.dim() != 2:
            raise ValueError(f"the model must return logits of shape [batch, classes], got "
                             f"{tuple(out.shape)}")
        check_data(x, y, num_classes=out.shape[1], name="training data")
        if not torch.is_floating_point(x):
            raise TypeError(f"training images must be a floating-point tensor, got {x.dtype}")
        if self.hparams["batch_size"] > len(x):
            raise ValueError(f"batch_size={self.hparams['batch_size']} is larger than the "
                             f"training set ({len(x)} samples)")
        return x.to(self.device, self.param_dtype), y.to(self.device)

    def _prepare(self, x: torch.Tensor) -> None:
        if self.names is None:
            sample = x[:2]
            self.names = select_params(self.model, self.params_spec, sample)
            order = [m for _, m in execution_order(self.model, sample)]
            self.loss = BatchedLoss(self.model, self.names, order,
                                    vectorize=self.hparams["vectorize"])
        if self.calib_idx is None:
            self.calib_idx = spread_indices(len(x), self.hparams["calib_size"])
        if not self._initialised:
            self._init_search()
            self._initialised = True

    def theta(self) -> torch.Tensor:
        """The selected parameters as one flat vector (a copy)."""
        params = dict(self.model.named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for n in self.names])

    @torch.no_grad()
    def write(self, theta: torch.Tensor) -> None:
        """Write a flat vector into the selected parameters of the model."""
        params = dict(self.model.named_parameters())
        for n, t in self.loss.unflatten(theta).items():
            params[n].copy_(t)

    # -- the search --------------------------------------------------------------------------------
    def run(self, x, y: Optional[torch.Tensor] = None, *,
            progress: bool = False) -> Iterator[GenerationStats]:
        """Run the remaining generations on ``(x, y)`` (or a Dataset/DataLoader ``x``); yields one
        :class:`GenerationStats` per generation; :meth:`state_dict` taken at a yield resumes right
        after that generation."""
        x, y = self._data(x, y)
        self._prepare(x)
        g = self.hparams["generations"]
        bar = _progress(total=self.total_generations, initial=self.generation,
                        desc=self.method or "generations", enabled=progress)
        try:
            while not self.done:
                t0 = time.perf_counter()
                cycle = self.cycle
                with torch.no_grad():
                    mean, best, sigma = self._generation(x, y)
                self.evaluations += self.hparams["population"] * self.hparams["batch_size"]
                self.generation += 1
                stats = GenerationStats(cycle, self.generation - 1, self.evaluations, mean, best,
                                        sigma, time.perf_counter() - t0, self.generation % g == 0)
                bar.set_postfix(loss=f"{best:.4f}")
                bar.update(1)
                yield stats
        finally:
            bar.close()

    def _init_search(self) -> None:
        """Set up the search state from the model (first run only; not after a resume)."""

    def _generation(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
        """One generation; returns (mean loss, best loss, sigma) per sample."""
        raise NotImplementedError

    def _search_state(self) -> Dict[str, Any]:
        return {}

    def _load_search_state(self, state: Dict[str, Any]) -> None:
        pass

    # -- evaluation and checkpoints -------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> nn.Module:
        """Recompute BatchNorm statistics on the calibration images of training set ``x`` and put
        the model in eval mode."""
        x = x.to(self.device, self.param_dtype)
        if self.calib_idx is None:
            self.calib_idx = spread_indices(len(x), self.hparams["calib_size"])
        return batchnorm.calibrate(self.model, x[self.calib_idx.to(x.device)])

    def state_dict(self) -> Dict[str, Any]:
        """Weights, generator state, position, evaluation count, hyperparameters and the method's
        search state."""
        return {
            "format": STATE_FORMAT,
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "generator": self.generator.get_state(),
            "generation": self.generation,
            "evaluations": self.evaluations,
            "calib_idx": self.calib_idx,
            "hparams": dict(self.hparams),
            "search": self._search_state() if self._initialised else None,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the method and hyperparameters must match."""
        missing = {"format", "model", "generator", "generation", "hparams"} - set(state)
        if missing:
            raise ValueError(f"not a {type(self).__name__} state dict: missing {sorted(missing)}")
        if state["format"] != STATE_FORMAT:
            raise ValueError(f"state format {state['format']} is not supported (this version "
                             f"reads format {STATE_FORMAT})")
        saved = state["hparams"].get("method")
        if saved != self.method:
            raise ValueError(f"the checkpoint was made by method {saved!r}, not {self.method!r}")
        diff = {k: (v, self.hparams.get(k)) for k, v in state["hparams"].items()
                if self.hparams.get(k) != v}
        if diff:
            raise ValueError("the checkpoint was made with other hyperparameters "
                             + ", ".join(f"{k}: saved {a!r} vs {b!r}"
                                         for k, (a, b) in diff.items()))
        self.model.load_state_dict(state["model"])
        self.generator.set_state(state["generator"])
        self.generation = int(state["generation"])
        self.evaluations = int(state.get("evaluations", 0))
        self.calib_idx = state.get("calib_idx")
        if state.get("search") is not None:
            self._load_search_state(state["search"])
            self._initialised = True
