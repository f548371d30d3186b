"""``torch.optim``-style forms of the gradient-free methods, for any model (the generic path).

::

    opt = rso_ext.optim.TicketFinder(model.parameters(), sparsity=0.5)

    for data, target in train_loader:
        def closure():                      # no backward: the loss of the current parameters
            return F.nll_loss(model(data), target)
        loss = opt.step(closure)            # the next 32 weights

**The closure contract.** ``step(closure)`` calls the closure many times, each time with the
parameters set to one candidate, under ``torch.no_grad()``; the closure returns the loss (a scalar
tensor or a float; lower is better) and must not call ``backward``. With ``pool_size=N`` (the size
of the training set) and ``batch_size=B`` given, the optimizer draws the minibatches from its own
generator exactly as the class forms of :mod:`rso_ext.methods` do and calls ``closure(idx)`` with
an int64 CPU tensor of ``B`` indices into the training set. Without ``pool_size`` it calls
``closure()`` and the closure must use the same data for every call of one step.

**What one step is.** For the per-weight methods (:class:`RandomSearch`,
:class:`SimulatedAnnealing`, :class:`TicketFinder`) one step visits the next ``weights_per_step``
weights (default :data:`WEIGHTS_PER_STEP` = 32), going on where the previous step stopped
(fewer at the end of a sweep: a step never spans two sweeps), so a step costs a bounded amount of
work and fits the loop every PyTorch user writes (one ``step``
per minibatch). A *sweep* visits every parameter tensor in the order given (param groups in
order, then their parameters), every entry in row-major order, with the streams of
:mod:`rso_ext.streams` drawn when the sweep reaches the tensor (SA's acceptance uniforms right
after); ``cycles`` sets the length of the annealing and sparsity schedules (sweep ``s`` is cycle
``s``; ``opt.sweeps`` counts the finished ones). ``weights_per_step=None`` makes one step one
whole sweep. Either way the draws and decisions are the same: only where the steps cut differs.
``step`` returns what the closure returned for the value kept at the last weight visited (the
loss of the parameters as the step leaves them, on that weight's minibatch). For
:class:`EvolutionStrategy` and :class:`GeneticAlgorithm` one step is one generation over the
concatenation of all parameters (hyperparameters are read from the first param group).

**Randomness inside the closure.** The candidates of one weight (and the members of one
generation) are compared under the same randomness: torch's global random state (the CPU's and
the parameter's CUDA device's) is saved before the first closure call and restored before each
further one, so a model in train mode draws the same dropout masks for each candidate. The next
weight draws afresh.

**Matching the class forms.** Each class here is the method of the same name in
:mod:`rso_ext.methods` (``RandomSearch``, also named ``RSO``, is :class:`rso_ext.RSO`; the
table is in :mod:`rso_ext.methods`, and each class's ``method`` is its registry name). The same
code decides in both forms (the per-weight loops :class:`rso_ext.sweep.TorchSweeper`,
:func:`rso_ext.methods.sa.sa_loop`, :func:`rso_ext.methods.ticket.ticket_loop`; ES and GA ask and
tell through :class:`rso_ext.methods.es.ESStrategy` and :class:`rso_ext.methods.ga.GAStrategy`,
on the concatenated parameters), and the random draws come in the same order, so on the same seed (and ``pool_size`` = the training-set size) the optimizer and
class forms reach the same weights wherever the loss margins exceed float noise: pass the
parameters in the class form's order (``visiting_order(model, sample)`` for the per-weight
methods, which visit layers last to first; ``model.parameters()`` for ES/GA, whose vector follows
``named_parameters``) and let the closure return the summed cross-entropy in float64. The per-weight
class forms put BatchNorm layers in search mode (running statistics upstream of the swept layer),
which a closure cannot know about: their forms agree on models without BatchNorm. The ES/GA
class forms use minibatch statistics everywhere, as a model in train mode does.

State: ``state_dict()`` holds torch's usual entries plus ``"rso_ext"`` (generator state, step
count, per-parameter search state such as masks and initial weights, ES moments, GA population);
``load_state_dict`` restores them, so a resumed optimizer continues the same sequence.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from . import schedule
from .checks import check_choice, check_generator, check_int, check_pool_and_batch, check_range
from .methods.base import draw_batch
from .methods.es import ESStrategy, check_es
from .methods.ga import GAStrategy, check_ga, default_parents
from .methods.sa import SCHEDULES as SA_SCHEDULES
from .methods.sa import sa_loop, temperature
from .methods.ticket import INITS, SCHEDULES as TICKET_SCHEDULES
from .methods.ticket import kept_cap, signed_constant_, target_sparsity, ticket_loop
from .streams import SAMPLERS, SweepStreams
from .sweep import TorchSweeper
from .visit import MIXING, visit_units

__all__ = ["RandomSearch", "RSO", "SimulatedAnnealing", "TicketFinder", "EvolutionStrategy",
           "GeneticAlgorithm", "visiting_order"]


#: weights a per-weight optimizer visits per ``step`` unless told otherwise: two or three closure
#: calls per weight, so a step costs 64 to 96 forward passes of the closure's minibatch
WEIGHTS_PER_STEP = 32


def visiting_order(model: nn.Module, sample: torch.Tensor, weights_only: bool = False
                   ) -> List[nn.Parameter]:
    """``model``'s parameters in the visiting order of the per-weight class forms (layers last to
    first, see :mod:`rso_ext.visit`); ``weights_only`` keeps conv/linear weights (what
    :class:`rso_ext.methods.TicketFinder` visits)."""
    units = visit_units(model, sample)
    if weights_only:
        units = [u for u in units if isinstance(u.module, MIXING) and u.param_name == "weight"]
    return [u.param for u in units]


class _ParamUnit:
    """What the weight loops need of a :class:`rso_ext.visit.Unit`."""

    def __init__(self, param: torch.Tensor, name: str) -> None:
        self.param, self.name = param, name


class _SameRandomness:
    """Saves torch's global random state (the CPU's and, for a CUDA parameter, its device's) and
    puts it back before each further closure call of one weight (or one generation), so dropout
    and every other random op of the model draw the same numbers for each candidate. After the
    last call the state runs on from there: the next weight draws new numbers."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = (device, torch.cuda.get_rng_state(device)) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda[1], self.cuda[0])


class _ClosureEvaluator:
    """Candidate evaluator (``losses``/``set``) that calls the closure once per candidate, each
    call under the same randomness; ``last`` is what the closure returned for the candidate kept
    at the latest weight. ``scale`` multiplies the losses the decision sees."""

    def __init__(self, param: torch.Tensor, call: Callable[[Optional[torch.Tensor]], Any],
                 scale: float = 1.0):
        self.param, self.call, self.scale = param, call, scale
        self.last: Any = None
        self._k, self._values, self._raw = -1, None, []

    def begin(self, unit, x) -> None:
        pass

    def losses(self, k: int, values: torch.Tensor, idx, target=None) -> torch.Tensor:
        flat = self.param.data.view(-1)
        rng = _SameRandomness(flat.device)
        raw = []
        for j, v in enumerate(values):
            if j:
                rng.restore()
            flat[k] = v
            raw.append(self.call(idx))
        self._k, self._values, self._raw = k, values, raw
        return torch.tensor([float(r) * self.scale for r in raw], dtype=torch.float64)

    def set(self, k: int, value: torch.Tensor) -> None:
        self.param.data.view(-1)[k] = value
        if k == self._k:
            hit = (self._values == value).nonzero()
            if len(hit):
                self.last = self._raw[int(hit[0])]

    def set_many(self, ks: torch.Tensor, values: torch.Tensor) -> None:
        for k, v in zip(ks.tolist(), values):
            self.set(k, v)

    def end(self) -> None:
        pass


class _GradientFree(torch.optim.Optimizer):
    """Shared parts: the generator, the closure contract, the extra state."""

    def __init__(self, params, defaults: Dict[str, Any], pool_size: Optional[int],
                 batch_size: Optional[int], generator: Optional[torch.Generator]) -> None:
        check_pool_and_batch(pool_size, batch_size)
        check_generator(generator)
        super().__init__(params, defaults)
        self.pool_size, self.batch_size = pool_size, batch_size
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.steps = 0
        self.extra: Dict[str, Any] = {}

    def _params(self) -> List[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _caller(self, closure) -> Callable[[Optional[torch.Tensor]], float]:
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure that returns the loss "
                             "(no backward)")
        with_idx = self.pool_size is not None

        def call(idx):
            with torch.no_grad():
                return closure(idx) if with_idx else closure()
        return call

    def _batch(self) -> Optional[torch.Tensor]:
        if self.pool_size is None:
            return None
        return draw_batch(self.generator, self.pool_size, self.batch_size)

    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        sd["rso_ext"] = {"generator": self.generator.get_state(), "steps": self.steps,
                         "extra": _clone(self.extra)}
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        ours = state_dict.pop("rso_ext", None)
        if ours is None:
            raise ValueError(f"not a {type(self).__name__} state dict: no 'rso_ext' entry")
        super().load_state_dict(state_dict)
        self.generator.set_state(ours["generator"])
        self.steps = int(ours["steps"])
        dev = self._params()[0].device
        self.extra = _clone(ours["extra"], dev)


def _clone(obj, device=None):
    if torch.is_tensor(obj):
        t = obj.clone()
        return t if device is None or t.dtype == torch.bool else t.to(device)
    if isinstance(obj, dict):
        return {k: _clone(v, device) for k, v in obj.items()}
    return obj


# -- per-weight methods ----------------------------------------------------------------------------
class _PerWeight(_GradientFree):
    """A sweep visits every entry of every parameter (param groups in order); one ``step`` visits
    the next ``weights_per_step`` entries, going on where the last step stopped and into the next
    tensor as needed, and ends early at the end of a sweep (a step never spans two sweeps);
    ``weights_per_step=None``: one whole sweep per step.
    A tensor's streams are drawn when the sweep reaches it, so the pieces make the same draws and
    decisions as one whole sweep. ``sweeps`` counts the finished sweeps (the cycle of the
    schedules), ``visited`` the weights visited, ``moves`` those changed by the loss."""

    def __init__(self, params, defaults, cycles, sampler, pool_size, batch_size, generator,
                 weights_per_step):
        check_int("cycles", cycles, 1)
        check_choice("sampler", sampler, SAMPLERS)
        if weights_per_step is not None:
            check_int("weights_per_step", weights_per_step, 1)
        defaults = dict(defaults, cycles=cycles, sampler=sampler)
        super().__init__(params, defaults, pool_size, batch_size, generator)
        self.weights_per_step = weights_per_step
        self.sweeps = 0
        self.visited = 0
        self.moves = 0
        self.pos: Optional[Dict[str, Any]] = None     # the tensor being swept and its streams

    @property
    def cycle(self) -> int:
        return min(self.sweeps, self.param_groups[0]["cycles"] - 1)

    def _streams(self, p: torch.Tensor, sigma: float, sampler: str) -> SweepStreams:
        pool = self.pool_size or 1
        return SweepStreams.draw(self.generator, p.numel(), sigma, pool, self.batch_size or 1,
                                 sampler)

    def _units(self) -> List[tuple]:
        return [(g, p) for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        """Visits the next ``weights_per_step`` weights (or a whole sweep); returns what the
        closure returned for the value kept at the last weight visited."""
        call = self._caller(closure)
        units = self._units()
        budget = self.weights_per_step
        last = None
        while budget is None or budget > 0:
            if self.pos is None:
                self.pos = self._start(0, *units[0])
            i, k = self.pos["param"], self.pos["k"]
            g, p = units[i]
            stop = p.numel() if budget is None else min(p.numel(), k + budget)
            ev = _ClosureEvaluator(p, call)
            self.moves += self._visit(i, p, g, ev, k, stop)
            self.visited += stop - k
            last = ev.last if ev.last is not None else last
            if budget is not None:
                budget -= stop - k
            if stop < p.numel():
                self.pos["k"] = stop
            elif i + 1 < len(units):
                self.pos = self._start(i + 1, *units[i + 1])
            else:                       # the sweep is done: the step ends with it
                self.pos = None
                self.sweeps += 1
                break
        self.steps += 1
        return last

    def _start(self, i: int, g: Dict[str, Any], p: torch.Tensor) -> Dict[str, Any]:
        """The state of the sweep of tensor ``i`` at its first weight (its streams drawn)."""
        raise NotImplementedError

    def _visit(self, i, p, g, ev, k0: int, k1: int) -> int:
        """Visit weights ``k0 .. k1-1`` of tensor ``i``; returns the weights changed."""
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        pos = None
        if self.pos is not None:
            pos = _clone({k: (dataclasses.asdict(v) if isinstance(v, SweepStreams) else v)
                          for k, v in self.pos.items()})
        sd["rso_ext"].update(sweeps=self.sweeps, visited=self.visited, moves=self.moves, pos=pos)
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        ours = state_dict["rso_ext"]
        # states saved when one step was one sweep have no "sweeps": there steps were sweeps
        self.sweeps = int(ours.get("sweeps", self.steps))
        self.moves = int(ours.get("moves", 0))
        self.visited = int(ours.get("visited", 0))
        pos = ours.get("pos")
        if pos is not None:
            pos = _clone(pos)
            pos["streams"] = SweepStreams(**pos["streams"])
        self.pos = pos


def _sigma0(p: torch.Tensor, sigma, sample_scale: float, bn_sigma: float) -> float:
    if not isinstance(sigma, str):
        return float(sigma)
    if p.dim() > 1:
        return math.sqrt(2.0 / p[0].numel()) * sample_scale
    return bn_sigma


class RandomSearch(_PerWeight):
    """RSO as an optimizer: each weight tries ``{w', w'+d, w'-d}`` (``w' = w (1 - weight_decay)``,
    ``d ~ N(0, sigma)`` annealed linearly to ``alpha * sigma`` over ``cycles``) and keeps the
    lowest loss, ties keeping ``w'``: :class:`rso_ext.sweep.TorchSweeper` on the closure.

    ``sigma="he"``: ``sqrt(2 / fan_in) * sample_scale`` for tensors of 2 or more dimensions,
    ``bn_sigma`` for 1-D tensors (BatchNorm gamma/beta, biases); or a float for every tensor."""

    method = "rso"    # rso_ext.methods.METHODS['rso'] is the class form

    def __init__(self, params: Iterable, *, cycles: int = 50, alpha: float = 0.1,
                 weight_decay: float = 1e-4, sigma="he", sample_scale: float = 1.0,
                 bn_sigma: float = schedule.BN_SIGMA, sampler: str = "shuffle",
                 pool_size: Optional[int] = None, batch_size: Optional[int] = None,
                 generator: Optional[torch.Generator] = None,
                 weights_per_step: Optional[int] = WEIGHTS_PER_STEP) -> None:
        check_range("alpha", alpha, 0.0, 1.0)
        check_range("weight_decay", weight_decay, 0.0, 1.0, hi_open=True)
        if isinstance(sigma, str):
            check_choice("sigma", sigma, ("he",))
        else:
            check_range("sigma", sigma, 0.0)
        super().__init__(params, dict(alpha=alpha, weight_decay=weight_decay, sigma=sigma,
                                      sample_scale=sample_scale, bn_sigma=bn_sigma),
                         cycles, sampler, pool_size, batch_size, generator, weights_per_step)

    def _start(self, i, g, p):
        s0 = _sigma0(p, g["sigma"], g["sample_scale"], g["bn_sigma"])
        return dict(param=i, k=0, streams=self._streams(
            p, schedule.annealed(s0, self.cycle, g["cycles"], g["alpha"]), g["sampler"]))

    def _visit(self, i, p, g, ev, k0, k1) -> int:
        sweeper = TorchSweeper(_ParamUnit(p, f"param{i}"), ev)
        sweeper.begin(torch.empty(0, device=p.device),
                      torch.zeros(self.pool_size or 1, dtype=torch.int64))
        try:
            accepted, _ = sweeper.run(k0, k1, self.pos["streams"], 1.0 - g["weight_decay"])
        finally:
            sweeper.end()
        return accepted


class SimulatedAnnealing(RandomSearch):
    """Simulated annealing as an optimizer (the rule of :mod:`rso_ext.methods.sa`): one proposal
    ``w' + d`` per weight, accepted by Metropolis at temperature ``T_c`` (``t0`` -> ``t_final``
    over ``cycles``) on the per-sample loss change. ``reduction`` says how the closure reduces over
    the minibatch: ``"sum"`` (divided by ``batch_size`` here, as the class form does) or
    ``"mean"``."""

    method = "sa"    # rso_ext.methods.METHODS['sa'] is the class form

    def __init__(self, params: Iterable, *, t0: float = 1e-3, t_final: float = 1e-5,
                 schedule: str = "exp", reduction: str = "mean", **kwargs: Any) -> None:
        check_range("t0", t0, 0.0)
        check_range("t_final", t_final, 0.0)
        check_choice("schedule", schedule, SA_SCHEDULES)
        check_choice("reduction", reduction, ("sum", "mean"))
        if reduction == "sum" and kwargs.get("batch_size") is None:
            raise ValueError("reduction='sum' needs batch_size (to turn sums into per-sample "
                             "losses)")
        super().__init__(params, **kwargs)
        for g in self.param_groups:
            g.setdefault("t0", t0)
            g.setdefault("t_final", t_final)
            g.setdefault("schedule", schedule)
        self.defaults.update(t0=t0, t_final=t_final, schedule=schedule)
        self.reduction = reduction

    def _start(self, i, g, p):
        pos = super()._start(i, g, p)      # the streams, then the acceptance uniforms
        pos["uniforms"] = torch.rand(p.numel(), generator=self.generator, dtype=torch.float64)
        return pos

    def _visit(self, i, p, g, ev, k0, k1) -> int:
        temp = temperature(g["t0"], g["t_final"], self.cycle, g["cycles"], g["schedule"])
        # sa_loop divides the loss change by the minibatch length: undo that for mean losses
        ev.scale = 1.0 if self.reduction == "sum" else float(self.batch_size or 1)
        accepted, _ = sa_loop(_ParamUnit(p, f"param{i}"), ev, None, k0, k1, self.pos["streams"],
                              1.0 - g["weight_decay"], self.pos["uniforms"], temp)
        return accepted


class TicketFinder(_PerWeight):
    """Lottery-ticket mask search as an optimizer (the rule of :mod:`rso_ext.methods.ticket`):
    the parameters keep their values at the first step (``init="model"``) or their signed
    constants (``init="signed_constant"``); each entry is switched between that value and 0 by the
    loss, with a cap of ``1 - s_c`` kept entries per tensor after each step (``sparsity``,
    ``schedule`` over ``cycles``). Masks and initial values are in ``opt.masks()`` and the
    state."""

    method = "ticket"    # rso_ext.methods.METHODS['ticket'] is the class form

    def __init__(self, params: Iterable, *, sparsity: float = 0.5, cycles: int = 5,
                 schedule: str = "constant", init: str = "model", sampler: str = "shuffle",
                 pool_size: Optional[int] = None, batch_size: Optional[int] = None,
                 generator: Optional[torch.Generator] = None,
                 weights_per_step: Optional[int] = WEIGHTS_PER_STEP) -> None:
        check_range("sparsity", sparsity, 0.0, 1.0, hi_open=True)
        check_choice("schedule", schedule, TICKET_SCHEDULES)
        check_choice("init", init, INITS)
        super().__init__(params, dict(sparsity=sparsity, schedule=schedule, init=init),
                         cycles, sampler, pool_size, batch_size, generator, weights_per_step)

    def _start(self, i, g, p):
        st = self.extra.setdefault(i, {})
        if "w_init" not in st:
            if g["init"] == "signed_constant":
                signed_constant_(p.data)
            st["w_init"] = p.detach().clone()
            st["mask"] = torch.ones(p.numel(), dtype=torch.bool)
        cap = kept_cap(p.numel(), target_sparsity(g["sparsity"], self.cycle, g["cycles"],
                                                  g["schedule"]))
        return dict(param=i, k=0, streams=self._streams(p, 0.0, g["sampler"]), cap=cap,
                    cost=torch.full((p.numel(),), math.inf, dtype=torch.float64))

    def _visit(self, i, p, g, ev, k0, k1) -> int:
        st, pos = self.extra[i], self.pos
        flips, _, _ = ticket_loop(_ParamUnit(p, f"param{i}"), ev, None, k0, k1, pos["streams"],
                                  st["w_init"].view(-1), st["mask"], pos["cap"],
                                  cost=pos["cost"], prune=k1 == p.numel())
        return flips

    def masks(self) -> List[Optional[torch.Tensor]]:
        """The keep masks (bool, shaped like each parameter; None before the first step)."""
        out = []
        for i, p in enumerate(self._params()):
            st = self.extra.get(i)
            out.append(None if st is None else st["mask"].view(p.shape).clone())
        return out


# -- population methods ----------------------------------------------------------------------------
class _Population(_GradientFree):
    def _theta(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self._params()])

    @torch.no_grad()
    def _write(self, theta: torch.Tensor) -> None:
        torch.nn.utils.vector_to_parameters(theta, self._params())

    def _evaluate(self, thetas: torch.Tensor, call, idx) -> torch.Tensor:
        """The members' losses, each closure call under the same randomness (as the candidates
        of one weight are)."""
        rng = _SameRandomness(self._params()[0].device)
        out = []
        for j, t in enumerate(thetas):
            if j:
                rng.restore()
            self._write(t)
            out.append(float(call(idx)))
        return torch.tensor(out, dtype=torch.float64)


class EvolutionStrategy(_Population):
    """The ES of :mod:`rso_ext.methods.es` as an optimizer: one step = one generation of
    ``population`` antithetic members ``theta + sigma * eps`` (one closure call each),
    centred-rank shaping, an Adam (or SGD) step of size ``lr``. Returns the mean member loss."""

    method = "es"    # rso_ext.methods.METHODS['es'] is the class form

    def __init__(self, params: Iterable, *, population: int = 50, sigma: float = 0.02,
                 lr: float = 0.01, optimizer: str = "adam", weight_decay: float = 0.0,
                 pool_size: Optional[int] = None, batch_size: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> None:
        check_es(population, sigma, lr, weight_decay, optimizer)
        super().__init__(params, dict(population=population, sigma=sigma, lr=lr,
                                      optimizer=optimizer, weight_decay=weight_decay),
                         pool_size, batch_size, generator)

    @torch.no_grad()
    def step(self, closure=None):
        call = self._caller(closure)
        strategy = ESStrategy(self.param_groups[0], self.generator, self.extra)
        theta = self._theta()
        idx = self._batch()
        losses = self._evaluate(strategy.ask(theta), call, idx)
        self._write(strategy.tell(losses))
        self.steps += 1
        return losses.mean()


class GeneticAlgorithm(_Population):
    """The GA of :mod:`rso_ext.methods.ga` as an optimizer: one step = one generation (one closure
    call per member); the parameters hold the best member of the generation after the step, whose
    loss it returns."""

    method = "ga"    # rso_ext.methods.METHODS['ga'] is the class form

    def __init__(self, params: Iterable, *, population: int = 50, elite: int = 1,
                 parents: Optional[int] = None, sigma: float = 0.01,
                 pool_size: Optional[int] = None,
                 batch_size: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> None:
        parents = default_parents(population) if parents is None else parents
        check_ga(population, elite, parents, sigma)
        super().__init__(params, dict(population=population, elite=elite, parents=parents,
                                      sigma=sigma), pool_size, batch_size, generator)

    @torch.no_grad()
    def step(self, closure=None):
        call = self._caller(closure)
        strategy = GAStrategy(self.param_groups[0], self.generator, self.extra)
        if not strategy.started:
            strategy.start(self._theta())
        idx = self._batch()
        losses = self._evaluate(strategy.ask(), call, idx)
        self._write(strategy.tell(losses))
        self.steps += 1
        return losses[strategy.best_index]


#: the optimizer form of :class:`rso_ext.RSO` under the class form's name
RSO = RandomSearch
