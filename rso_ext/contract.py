"""The contract of every search method's class form, the statistics they all yield, and the
registry the command line reads.

**The contract** (:class:`Method`; :class:`rso_ext.RSO` and every class of
:mod:`rso_ext.methods` derive from it)::

    search = Cls(model, *, loss=None, generator=None, **hyperparameters)
    stats  = search.step(x, y)          # one step; returns a Stats
    for stats in search.run(x, y):      # the remaining steps, one Stats each
        state = search.state_dict()     # taken at any yield, resumes right after that step
    search.load_state_dict(state)
    search.check(x, y)                  # raise now what run would raise before its first step
    search.calibrate(x)                 # BatchNorm statistics for evaluation; returns the model

* ``model``: the ``nn.Module`` searched, changed in place (``search.model``); it must return
  logits ``[batch, classes]``. ``generator``: the CPU ``torch.Generator`` every random draw comes
  from (default: seed 0). ``loss``: see :mod:`rso_ext.losses` (default: summed cross-entropy).
* ``x, y``: training images and labels as tensors, or ``x`` alone as a Dataset/DataLoader of
  (image, label) pairs. ``step()`` without data reuses the data of the previous ``step`` call.
* **one step** is one unit sweep for a per-weight method (every weight of one parameter tensor
  visited once: :attr:`Method.kind` ``"per-weight"``) or one generation for a population method
  (``"population"``); ``cycles`` of them make the run. A step after the last one raises
  ``RuntimeError``.
* position: ``search.cycle`` (0-based), ``search.unit`` (the step within the cycle),
  ``search.done``; ``search.hparams`` (what ``load_state_dict`` insists on) and
  ``search.backend_reason`` (a line saying which candidate evaluator runs and why; ``""`` where
  there is no choice).
* population methods add ``ask()`` / ``tell(losses)`` (:class:`rso_ext.methods.PopulationMethod`).

Each class declares, for the registry: :attr:`Method.method` (its name, ``--method`` on the
command line), :attr:`Method.summary` (one line) and :attr:`Method.cli_options` (which train
options of the command line it takes, mapped to its constructor arguments). :func:`register`
adds a class to :data:`METHODS`; :func:`from_config` and the command line's help are derived
from it.

**The statistics** of a step are one :class:`Stats` for every method.
"""
from __future__ import annotations

import abc
import inspect
from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar, Dict, Iterator, Mapping, Optional, Type

import torch
from torch import nn

KINDS = ("per-weight", "population")


@dataclass(kw_only=True)
class Stats:
    """What one step of a search did. The first fields are common to every method; the others
    are ``None`` where they do not apply and are then left out of :meth:`as_dict` (the rows of
    ``metrics.jsonl``).

    Per-weight methods (one unit sweep) fill ``unit``, ``weights``, ``accepted``; population
    methods (one generation) ``generation``, ``best_loss``; simulated annealing
    ``temperature``; the lottery-ticket search ``sparsity``, ``target``, ``forced``."""

    method: str             # the method's registry name ("rso", "sa", "es", ...)
    cycle: int              # 0-based
    step: int               # 0-based index of the step over the whole run
    layer: str              # what was searched: the unit "module.param", or the parameter
    #                         selection of a population method ("all", "bn+last", ...)
    evaluations: int        # sample-forward evaluations so far (candidates x minibatch size)
    mean_loss: float        # per-weight: mean over visits of the kept summed loss / batch size;
    #                         population: mean over the members of the summed loss / batch size
    sigma: float            # perturbation scale used
    seconds: float
    cycle_done: bool        # last step of the cycle
    # per-weight methods
    unit: Optional[int] = None          # index of the unit in visiting order
    weights: Optional[int] = None       # weights visited
    accepted: Optional[int] = None      # visits where a perturbed (or flipped) candidate won
    # population methods
    generation: Optional[int] = None    # 0-based, counted over the whole run (= step)
    best_loss: Optional[float] = None   # lowest member loss / batch size
    # method-specific
    temperature: Optional[float] = None  # sa: the cycle's temperature
    sparsity: Optional[float] = None     # ticket: pruned fraction of the unit after the sweep
    target: Optional[float] = None       # ticket: the cap's target for this cycle
    forced: Optional[int] = None         # ticket: weights pruned at the end to meet the cap

    def as_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class Method(abc.ABC):
    """The class form of a search method (see the module documentation for the contract).

    Subclasses implement :meth:`_data` (check and move the training data), :meth:`_prepare`
    (set-up on the first data: units, parameter selection, calibration images), :meth:`_advance`
    (one step, moving the position), :meth:`_progress` and the public :meth:`check`,
    :meth:`calibrate`, :meth:`state_dict`, :meth:`load_state_dict`; :meth:`step` and :meth:`run`
    are built on them here."""

    #: registry name (``--method``), one line for the help, "per-weight" or "population"
    method: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    #: train options of the command line (config keys) -> constructor arguments
    cli_options: ClassVar[Mapping[str, str]] = {}

    model: nn.Module
    hparams: Dict[str, Any]
    generator: torch.Generator
    backend_reason: str = ""
    #: ``run(stop=)``'s predicate while that run goes (per-weight methods poll it inside a sweep)
    _stop: Optional[Callable[[], bool]] = None

    # -- the steps ---------------------------------------------------------------------------
    def step(self, x=None, y: Optional[torch.Tensor] = None) -> Stats:
        """Advance one step (a unit sweep or a generation) on training data ``(x, y)`` and return
        its :class:`Stats`; without data, on the data of the previous :meth:`step` call."""
        if self.done:
            raise RuntimeError(f"{type(self).__name__}: the search is done (all "
                               f"{self.hparams['cycles']} cycles have run)")
        x, y = self._bind(x, y)
        self._prepare(x)
        return self._advance(x, y, False)

    def run(self, x, y: Optional[torch.Tensor] = None, *, progress: bool = False,
            stop: Optional[Callable[[], bool]] = None) -> Iterator[Stats]:
        """Run the remaining steps on training data ``(x, y)`` (tensors) or on ``x`` alone as a
        Dataset/DataLoader of (image, label) pairs. Yields one :class:`Stats` per step;
        :meth:`state_dict` taken at a yield resumes right after that step.

        ``stop`` (e.g. a time budget's check) is polled every few weights inside a per-weight
        method's unit sweep: when it returns True the sweep ends where it is, the visited weights
        keep their moves, and the step's Stats says how many it visited (``weights``); the
        position stays at that unit, so going on sweeps it again from its first weight with
        new random streams. A population method's step (one generation) does not poll it."""
        if stop is not None and not callable(stop):
            raise TypeError(f"stop must be a callable returning a bool, got {type(stop).__name__}")
        x, y = self._data(x, y)
        self._prepare(x)
        total, initial, desc = self._progress()
        bar = progress_bar(total=total, initial=initial, desc=desc, enabled=progress)
        try:
            while not self.done:
                self._stop = stop
                try:
                    stats = self._advance(x, y, progress)
                finally:
                    self._stop = None
                bar.set_postfix(**self._postfix(stats))
                bar.update(1)
                yield stats
        finally:
            bar.close()

    def _bind(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """The prepared training data of :meth:`step`: ``(x, y)`` checked and moved by
        :meth:`_data` once, reused while the same unchanged objects come again."""
        bound = getattr(self, "_bound", None)
        if x is None:
            if y is not None:
                raise TypeError("step(): labels y were given without images x")
            if bound is None:
                raise ValueError(f"{type(self).__name__}.step() needs training data the first "
                                 "time: step(x, y)")
            return bound[3]
        versions = (getattr(x, "_version", None), getattr(y, "_version", None))
        if bound is not None and bound[0] is x and bound[1] is y and bound[2] == versions:
            return bound[3]
        data = self._data(x, y)
        self._bound = (x, y, versions, data)
        return data

    @property
    def done(self) -> bool:
        return self.cycle >= self.hparams["cycles"]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def param_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- what subclasses provide ---------------------------------------------------------------
    @abc.abstractmethod
    def _data(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked training tensors on the model's device (``x`` alone: a dataset)."""

    @abc.abstractmethod
    def _prepare(self, x: torch.Tensor) -> None:
        """Set-up on the training images (idempotent)."""

    @abc.abstractmethod
    def _advance(self, x: torch.Tensor, y: torch.Tensor, progress: bool) -> Stats:
        """One step at the current position; moves the position."""

    @abc.abstractmethod
    def _progress(self) -> tuple[int, int, str]:
        """(total steps, steps done, label) of the progress bar of :meth:`run`."""

    def _postfix(self, stats: Stats) -> Dict[str, str]:
        return {"loss": f"{stats.mean_loss:.4f}"}

    @abc.abstractmethod
    def check(self, x, y: Optional[torch.Tensor] = None) -> None:
        """Raise now what :meth:`run` would raise before its first step on ``(x, y)``, changing
        neither the weights nor the generator."""

    @abc.abstractmethod
    def calibrate(self, x: torch.Tensor) -> nn.Module:
        """Recompute BatchNorm statistics on the calibration images of training set ``x`` and put
        the model in eval mode, ready for evaluation."""

    @abc.abstractmethod
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume: weights, generator state, position, hyperparameters and
        the method's own search state."""

    @abc.abstractmethod
    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the method and hyperparameters must match."""


def check_hparams(saved: Mapping[str, Any], mine: Mapping[str, Any],
                  always: tuple[str, ...] = ()) -> None:
    """ValueError naming every hyperparameter of a checkpoint that differs from this object's
    (those the checkpoint holds, and the ``always`` ones even where only one side has them)."""
    keys = list(saved) + [k for k in always if k not in saved]
    diff = {k: (saved.get(k), mine.get(k)) for k in keys if mine.get(k) != saved.get(k)}
    if diff:
        raise ValueError("the checkpoint was made with other hyperparameters "
                         + ", ".join(f"{k}: saved {a!r} vs {b!r}" for k, (a, b) in diff.items()))


# -- the registry ---------------------------------------------------------------------------------
#: name -> class form, in the order the classes registered (rso, sa, ticket, es, ga, dfo)
METHODS: Dict[str, Type[Method]] = {}


def constructor_arguments(cls: type) -> set[str]:
    """Keyword arguments ``cls(model, ...)`` takes, following ``**kwargs`` up the classes."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[2:]   # self, model
        names |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def register(cls: Type[Method]) -> Type[Method]:
    """Class decorator: add ``cls`` to :data:`METHODS` under ``cls.method``."""
    if not cls.method or not cls.summary or cls.kind not in KINDS:
        raise TypeError(f"{cls.__name__} must declare method, summary and kind {KINDS}")
    unknown = set(cls.cli_options.values()) - constructor_arguments(cls)
    if unknown:
        raise TypeError(f"{cls.__name__}.cli_options names {sorted(unknown)}, which its "
                        "constructor does not take")
    if METHODS.get(cls.method, cls) is not cls:
        raise TypeError(f"method name {cls.method!r} is taken by {METHODS[cls.method].__name__}")
    METHODS[cls.method] = cls
    return cls


def from_config(cfg: Mapping[str, Any], model: nn.Module, generator: torch.Generator) -> Method:
    """The search object of a command-line run configuration (``python -m rso_ext train``):
    ``cfg["method"]`` (default ``"rso"``) picks the class; each option it declares in
    :attr:`Method.cli_options` is passed when ``cfg`` holds a value (``None``: the class
    default)."""
    name = cfg.get("method") or "rso"
    if name not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {name!r}")
    cls = METHODS[name]
    kw = {arg: cfg[opt] for opt, arg in cls.cli_options.items() if cfg.get(opt) is not None}
    return cls(model, generator=generator, **kw)


def takers(option: str) -> str:
    """The methods taking a command-line option, as ``"es/ga/dfo"``."""
    return "/".join(n for n, c in METHODS.items() if option in c.cli_options)


def method_help(default: str = "rso") -> str:
    """The ``--method`` help: each registered name with its summary."""
    return "; ".join(f"{n}{' (default)' if n == default else ''}: {c.summary}"
                     for n, c in METHODS.items())


# -- progress bars --------------------------------------------------------------------------------
class _NoBar:
    n = 0

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **_: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0, leave: bool = True):
    """A tqdm bar, or a stand-in doing nothing when ``enabled`` is false."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, leave=leave, dynamic_ncols=True)
