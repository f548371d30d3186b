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
  the minibatch and Dropout off, as during an RSO sweep. A generation is ``ask()`` (the members),
  their losses, ``tell(losses)``: the algorithms themselves are ask/tell objects on flat vectors
  (:class:`rso_ext.methods.es.ESStrategy`, :class:`rso_ext.methods.ga.GAStrategy`, nevergrad's
  optimizer for DFO), which the :mod:`rso_ext.optim` forms drive too.

Both families follow :class:`rso_ext.contract.Method` and yield :class:`rso_ext.contract.Stats`.

Both families take the BatchNorm calibration images without consuming the generator: the
``calib_size`` training images at evenly spaced positions (:func:`spread_indices`). That keeps the
generator's sequence equal to the one the ``rso_ext.optim`` forms draw, so class and optimizer
forms make the same decisions on the same seed.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch
from torch import nn

from .. import batchnorm, distributed
# check_choice and check_range were defined here before rso_ext.checks: importable as before
from ..checks import (check_choice, check_generator, check_int, check_model,  # noqa: F401
                      check_range)
from ..data import check_data, from_dataset
from ..losses import Loss, check_loss, describe, is_cross_entropy, resolve
from ..contract import Method, Stats, check_hparams
from ..rso import RSO
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
    evaluator of the backend's sweeper (``losses(k, values, idx, target)`` / ``set(k, value)`` /
    ``set_many(ks, values)``)."""

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
            tick: Optional[Callable[[int], Optional[bool]]] = None) -> tuple[int, float]:
        return self.loop(self.unit, self.evaluator, self.y, k0, k1, streams, decay, tick)

    def end(self) -> None:
        self.inner.end()
        self.y = None


class PerWeightMethod(RSO):
    """RSO's driver with another per-weight decision rule (subclasses set :attr:`method` and
    implement :meth:`_loop`, called once per unit sweep with the sweep's streams)."""

    method = ""
    candidates = 2

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        if "candidate_steps" in kwargs:
            raise TypeError(f"{type(self).__name__} tries one candidate besides w' per weight; "
                            "candidate_steps is RSO's option")
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
def select_params(model: nn.Module, spec: ParamSpec,
                  sample: Optional[torch.Tensor] = None) -> list[str]:
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
                if sample is None:
                    raise ValueError("params='last' needs the model's execution order: give "
                                     "training data first (step, run or check)")
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
    """The summed loss (float64; ``loss``, :mod:`rso_ext.losses`, by default cross-entropy) of a
    population of flat parameter vectors on one minibatch.

    ``loss(thetas [P, D], x [B, ...], y [B]) -> float64 [P]``: member ``i`` is the model with the
    selected parameters (``names``, concatenated in that order) set to ``thetas[i]`` and every other
    parameter as it is. One ``vmap`` of ``functional_call`` over the population (in chunks of at
    most ``max_samples`` member-samples), every BatchNorm on its member's minibatch statistics.
    ``vectorize=False`` loops over the members instead (for models ``vmap`` cannot run)."""

    def __init__(self, model: nn.Module, names: Sequence[str], order: Sequence[nn.Module],
                 max_samples: int = 16384, vectorize: bool = True,
                 loss: Optional[Loss] = None) -> None:
        params = dict(model.named_parameters())
        self.loss = resolve(loss)
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
                out.append(self.loss(logits, y))
        return torch.cat(out)


#: the statistics of a generation: the one :class:`rso_ext.contract.Stats` of every method (the
#: old name, kept)
GenerationStats = Stats


class PopulationMethod(Method):
    """Driver of a whole-network population search: ``cycles`` x ``generations`` generations, one
    fresh minibatch of ``batch_size`` training samples per generation (:func:`draw_batch`), the
    model holding the method's current solution after every generation.

    The contract is :class:`rso_ext.contract.Method`'s (a step is one generation;
    ``cycle``/``unit`` give the position, ``unit`` being the generation within the cycle), plus
    the ask/tell pair of the algorithm on flat parameter vectors (the selected parameters,
    concatenated in ``named_parameters`` order, ``D`` entries)::

        thetas = search.ask()                  # [population, D], on the model's device and dtype
        losses = search.evaluate(thetas, xb, yb)   # or any float64 [population]: lower is better
        search.tell(losses)                    # one generation: search state and model updated

    ``step()`` is exactly that on a minibatch drawn from the generator after :meth:`start` and
    before ``ask``: ``start(); idx = draw_batch(generator, N, batch_size); ask(); evaluate(...,
    x[idx], y[idx]); tell(...)`` makes the same draws and updates as ``step(x, y)``. One ``tell``
    per ``ask``; ``tell`` counts ``population x batch_size`` evaluations and moves the position by
    one generation. :meth:`start` (called by the first ``ask``, ``step`` or ``run`` if not before)
    sets the search up from the model's current parameters: the GA draws its first population,
    DFO seeds and builds its optimizer.

    Subclasses implement :meth:`_init_search`, :meth:`_ask`, :meth:`_tell`,
    :meth:`_search_state`, :meth:`_load_search_state`."""

    kind = "population"
    cli_options = {"cycles": "cycles", "batch_size": "batch_size", "calib_size": "calib_size",
                   "generations": "generations", "population": "population", "noise": "sigma",
                   "params": "params"}

    def __init__(self, model: nn.Module, *, cycles: int, generations: int, batch_size: int,
                 population: int, params: ParamSpec = "all", calib_size: int = 2000,
                 generator: Optional[torch.Generator] = None, vectorize: bool = True,
                 loss: Optional[Loss] = None, **hparams: Any) -> None:
        check_model(model)
        for name, v in (("cycles", cycles), ("generations", generations),
                        ("batch_size", batch_size), ("population", population),
                        ("calib_size", calib_size)):
            check_int(name, v, 1)
        check_generator(generator)
        check_loss(loss)
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
        if not is_cross_entropy(loss):        # recorded only when not the default
            self.hparams["loss"] = describe(loss)
        self.loss = resolve(loss)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.generation = 0
        self.evaluations = 0
        self.calib_idx: Optional[torch.Tensor] = None
        self.names: Optional[list[str]] = None
        self.batched_loss: Optional[BatchedLoss] = None
        self._sample: Optional[torch.Tensor] = None     # two training images, once seen
        self._initialised = False
        self._asked = False

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
        p = self.hparams["population"]     # each rank takes a share of the members
        distributed.check_split(p, f"population={p}", x, y, first=self._sample is None)
        return x.to(self.device, self.param_dtype), y.to(self.device)

    def start(self) -> None:
        """Set the search up from the model's current parameters, once (not after a resume):
        the parameter selection, then the method's own state (which may draw from the
        generator)."""
        self._setup()

    def _setup(self) -> None:
        """The parameter selection and the search state (first use only; not after a resume)."""
        self._setup_names()
        if not self._initialised:
            self._init_search()
            self._initialised = True

    def _prepare(self, x: torch.Tensor) -> None:
        self._see(x)
        self._setup()
        self._prepare_loss()
        if self.calib_idx is None:
            self.calib_idx = spread_indices(len(x), self.hparams["calib_size"])

    def _see(self, x: torch.Tensor) -> None:
        """Keep two images of the data (execution order, ``params="last"``)."""
        if self._sample is None:
            self._sample = x[:2].clone()

    def _prepare_loss(self) -> None:
        self._setup_names()
        if self.batched_loss is None:
            order = [m for _, m in execution_order(self.model, self._sample)]
            self.batched_loss = BatchedLoss(self.model, self.names, order,
                                            vectorize=self.hparams["vectorize"], loss=self.loss)

    def check(self, x, y: Optional[torch.Tensor] = None) -> None:
        """Raise now what :meth:`run` would raise before its first generation on ``(x, y)`` (bad
        data, batch size, parameter selection), changing neither the weights nor the
        generator."""
        x, y = self._data(x, y)
        self._see(x)
        if self.names is None:
            select_params(self.model, self.params_spec, self._sample)

    def theta(self) -> torch.Tensor:
        """The selected parameters as one flat vector (a copy)."""
        self._setup_names()
        params = dict(self.model.named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for n in self.names])

    @torch.no_grad()
    def write(self, theta: torch.Tensor) -> None:
        """Write a flat vector into the selected parameters of the model."""
        self._setup_names()
        params = dict(self.model.named_parameters())
        sizes = [params[n].numel() for n in self.names]
        for n, t in zip(self.names, theta.split(sizes)):
            params[n].copy_(t.view(params[n].shape))

    def _setup_names(self) -> None:
        if self.names is None:
            self.names = select_params(self.model, self.params_spec, self._sample)

    # -- ask / tell ------------------------------------------------------------------------------
    def ask(self) -> torch.Tensor:
        """The parameter vectors of this generation's members, ``[population, D]`` (on the
        model's device, in its dtype). Call :meth:`tell` with their losses next."""
        if self.done:
            raise RuntimeError(f"{type(self).__name__}: the search is done (all "
                               f"{self.total_generations} generations have run)")
        self._setup()
        with torch.no_grad():
            thetas = self._ask()
        self._asked = True
        return thetas

    def tell(self, losses) -> None:
        """Take the losses (float64 ``[population]``, lower is better; what :meth:`evaluate`
        returns: summed over the minibatch) of the members of the last :meth:`ask`, update the
        search state, write the current solution into the model and move to the next
        generation."""
        if not self._asked:
            raise RuntimeError(f"{type(self).__name__}.tell() without ask(): ask for the "
                               "members first")
        p = self.hparams["population"]
        losses = torch.as_tensor(losses, dtype=torch.float64)
        if losses.shape != (p,):
            raise ValueError(f"tell() takes one loss per member: shape ({p},), got "
                             f"{tuple(losses.shape)}")
        with torch.no_grad():
            self._tell(losses)
        self._asked = False
        self.evaluations += p * self.hparams["batch_size"]
        self.generation += 1

    def evaluate(self, thetas: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """float64 ``[P]``: the summed loss of each member of ``thetas`` on ``(x, y)`` (tensors on
        the model's device), all in one batched forward (:class:`BatchedLoss`)."""
        if self.batched_loss is None:
            self._see(x)
            self._prepare_loss()
        if distributed.active():          # this rank's members, then everyone's losses
            a, b = distributed.shard(len(thetas), "the population")
            return distributed.gather_shards(
                self.batched_loss(thetas[a:b], x, y).to(torch.float64))
        return self.batched_loss(thetas, x, y)

    # -- the search --------------------------------------------------------------------------------
    def _advance(self, x: torch.Tensor, y: torch.Tensor, progress: bool) -> Stats:
        """One generation: the minibatch, then ask, evaluate, tell."""
        t0 = time.perf_counter()
        cycle = self.cycle
        h = self.hparams
        with torch.no_grad():
            idx = draw_batch(self.generator, len(x), h["batch_size"]).to(x.device)
            thetas = self.ask()
            losses = self.evaluate(thetas, x[idx], y[idx])
            self.tell(losses)
        b = h["batch_size"]
        return Stats(method=self.method, cycle=cycle, step=self.generation - 1,
                     layer=str(h["params"]), evaluations=self.evaluations,
                     mean_loss=float(losses.mean()) / b, sigma=h["sigma"],
                     seconds=time.perf_counter() - t0,
                     cycle_done=self.generation % h["generations"] == 0,
                     generation=self.generation - 1, best_loss=float(losses.min()) / b)

    def _progress(self) -> tuple[int, int, str]:
        return self.total_generations, self.generation, self.method or "generations"

    def _postfix(self, stats: Stats) -> Dict[str, str]:
        return {"loss": f"{stats.best_loss:.4f}"}

    def _init_search(self) -> None:
        """Set up the search state from the model (first use only; not after a resume)."""

    def _ask(self) -> torch.Tensor:
        raise NotImplementedError

    def _tell(self, losses: torch.Tensor) -> None:
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
        check_hparams(state["hparams"], self.hparams, always=("loss",))
        self.model.load_state_dict(state["model"])
        self.generator.set_state(state["generator"])
        self.generation = int(state["generation"])
        self.evaluations = int(state.get("evaluations", 0))
        self.calib_idx = state.get("calib_idx")
        self._asked = False
        if state.get("search") is not None:
            self._load_search_state(state["search"])
            self._initialised = True
