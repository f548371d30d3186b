"""``backend="fused"``: a unit sweep run by the compiled fused evaluation (docs/design.md §2).

Per unit sweep, the input ``X_d`` and the pre-activation ``Z_d`` of the swept layer are cached
for the whole pool; the compiled ``fused_sweep`` op then visits the weights neuron by neuron with
no Python per weight: evaluate the K candidates in one fused pass, choose, write the weight and
keep ``Z_d`` exact. The candidate values and minibatches are the driver's (rso_ext.streams), so
the decisions are those of ``backend="torch"`` wherever the loss margins exceed float noise.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .. import distributed, ops
from ..memory import ModuleFootprint, estimate_sweep_bytes, format_bytes
from ..streams import SweepStreams
from ..sweep import candidate_values, non_finite
from ..visit import Unit
from .lower_graph import GraphPlan
from .lower_sequential import Plan


def left_out_state_bytes(trace: Sequence[ModuleFootprint], owner_module: nn.Module,
                         weights_per_neuron: int, pool_size: int, batch_size: int) -> int:
    """Bytes of the per-neuron states a ``fused_sweep`` call keeps for a weight unit of a
    sequential program (csrc/core/fused.cpp, ``left_out_state``): one next-layer output of
    ``batch_size`` samples per minibatch that recurs within a neuron (the shuffle sampler
    cycles through ``pool_size // batch_size`` of them), at most ``_C.left_out_budget()``."""
    start = next((i for i, f in enumerate(trace) if f.module is owner_module), None)
    nxt = None if start is None else next(
        (f for f in trace[start + 1:] if isinstance(f.module, (nn.Conv2d, nn.Linear))), None)
    if nxt is None:
        return 0
    batches = max(1, pool_size // batch_size)
    recurring = min(batches, max(0, weights_per_neuron - batches))
    return min(ops.left_out_budget(), recurring * batch_size * nxt.out_bytes)


def fused_sweep_estimate(trace: Sequence[ModuleFootprint], owner_module: nn.Module,
                         pool_size: int, batch_size: int, candidates: int = 3,
                         side_bytes: int = 0, saved_bytes: int = 0,
                         state_bytes: int = 0) -> tuple[int, str]:
    """(bytes, description) of a ``backend="fused"`` sweep whose swept layer (the conv/linear
    that owns the unit) is ``owner_module``: its input ``X_d`` and pre-activation ``Z_d`` cached
    for the whole pool (filled chunk by chunk, plus one chunk's temporaries, counted with the
    minibatch's), and per minibatch the gathered rows plus the dense suffix run on all ``candidates``
    at once. A residual network's sweep (:mod:`.lower_graph`) also caches its side inputs,
    ``side_bytes`` per sample (counted as X_d is), and keeps values of ``saved_bytes`` per
    sample for later adds while a minibatch is evaluated (counted for every candidate); a
    weight unit of a sequential program keeps per-neuron states of ``state_bytes``
    (:func:`left_out_state_bytes`). The figure of :meth:`FusedSweeper.memory_estimate`."""
    start = next((i for i, f in enumerate(trace) if f.module is owner_module), 0)
    suffix = list(trace[start:]) or list(trace)
    x_d, z_d = suffix[0].in_bytes, suffix[0].out_bytes
    peak = max((f.in_bytes + f.out_bytes for f in suffix), default=0)
    cache = x_d + z_d + side_bytes
    per_batch = x_d + z_d + side_bytes + candidates * (peak + saved_bytes)
    total = estimate_sweep_bytes(pool_size, batch_size, cache, per_batch, state_bytes)
    cached = "cached X_d, Z_d" + (" and side inputs" if side_bytes else "")
    states = f" + per-neuron states {format_bytes(state_bytes)}" if state_bytes else ""
    return total, (f"{cached} {format_bytes(pool_size * cache)} for {pool_size} samples + "
                   f"activations {format_bytes(batch_size * per_batch)} for batch {batch_size}"
                   f"{states}")


def _across_ranks():
    """Under a process group of several ranks, the fused operators add their BatchNorm
    statistics and losses across it (:func:`rso_ext.ops.reduce_across`); else nothing."""
    if not distributed.active():
        return contextlib.nullcontext()
    return ops.reduce_across(torch.distributed.group.WORLD.group_name)


def _into(out: Optional[torch.Tensor], h: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Rows ``start ..`` of a cache of ``n`` rows (allocated at the first chunk) set to the chunk
    ``h``. Filling one tensor chunk by chunk, rather than concatenating kept chunks, touches the
    cache's memory once: on the full MNIST pool, the caches and stash of a paper_mnist sweep are
    gigabytes, and their first touch (page faults) cost as much as the forward that fills them."""
    if out is None:
        out = h.new_empty((n, *h.shape[1:]))
    out[start:start + len(h)].copy_(h)
    return out


def _staged(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor ``t`` on ``device``: through pinned memory and an asynchronous copy on CUDA
    (a pageable copy would wait for the GPU), as is on the CPU."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _snapshot(modules) -> list[torch.Tensor]:
    return [t.detach().clone() for m in modules for t in (*m.parameters(), *m.buffers())]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))


class CacheStore:
    """The caches of the last unit sweep, kept for the next unit of the same layer (a conv's
    BatchNorm gamma and beta are swept right after its weights, on the same ``X_d`` and
    ``Z_d``), and the inputs of shallower layers computed on the way (the ``stash``), kept for
    their own sweeps later in the cycle. An ``X_d`` is reused while the pool and every
    parameter and buffer of the layers before d are unchanged, ``Z_d`` while layer d's are too
    (compared by value, so a BatchNorm recalibration that reproduces its statistics keeps
    them)."""

    def __init__(self, stash: bool = True) -> None:
        self.entry: Optional[dict] = None
        #: inputs of shallower layers kept by a cache build from the data, by child index
        #: (``Plan.stash_points``); ``stash=False`` where every unit gets another pool
        self.stash: dict[int, dict] = {}
        self.stashing = stash

    def take(self) -> Optional[dict]:
        """The stored entry, removed from the store (so it is freed before new caches are
        built unless the caller keeps it)."""
        entry, self.entry = self.entry, None
        return entry

    def put(self, **entry) -> None:
        self.entry = entry


class FusedSweeper:
    """The fused weight loop of one unit (the :class:`rso_ext.sweep.Sweeper` protocol), also
    usable as a per-weight candidate evaluator (``losses``/``set``) by other methods."""

    #: weights handed to one call of the compiled sweep (bounds the minibatch index matrix)
    max_chunk = 4096

    def __init__(self, plan: Union[Plan, GraphPlan], unit: Unit, chunk: int = 1000,
                 store: Optional[CacheStore] = None, candidates: int = 3) -> None:
        self.plan, self.unit, self.chunk, self.store = plan, unit, chunk, store
        #: candidates per weight (K), for the memory estimate: the dense suffix runs K * B samples
        self.candidates = candidates
        self.x = self.z = self.y = None

    # -- caches -------------------------------------------------------------------------------
    @torch.no_grad()
    def begin(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Cache the swept layer's input and pre-activation for the pool ``x`` (call inside
        :func:`rso_ext.batchnorm.search_mode`, so the layers before it are fixed)."""
        if self.plan.dag:
            self._begin_graph(x, y)
            return
        self.prog = self.plan.program(self.unit)
        children = [s.module for s in self.plan.steps]
        start = self.prog.start
        prefix, layer = children[:start], children[start]
        self._key = (start, x, x._version)
        old = self.store.take() if self.store is not None else None
        if old is not None and old["key"][0] == start and old["key"][1] is x and \
                old["key"][2] == x._version and _same(old["prefix"], _snapshot(prefix)):
            self.x = old.pop("x")
            self.z = old.pop("z") if old["z"] is not None and \
                _same(old["layer"], _snapshot([layer])) else None
            del old    # an outdated Z_d is freed before it is rebuilt
            if self.z is None:
                self.z = self._build_z(start)
        else:
            del old    # free the other layer's caches before building these
            self.x = self._from_stash(start, x, prefix)
            if self.x is None:
                self.x = self._build_input(start, x)
            self.z = self._build_z(start)
        self.y = y

    def _begin_graph(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """:meth:`begin` for a traced graph (:mod:`rso_ext.fused.lower_graph`): ``X_d``, ``Z_d``
        and the side inputs of the program (values over the pool that do not depend on the swept
        layer), reused from the store while the pool and every module they depend on are
        unchanged."""
        prog = self.plan.program(self.unit)
        start, x_node, sides = prog.start, prog.x_node, prog.sides
        wanted = sorted({x_node, *(n for _, n in sides)})
        deps = self.plan.dependencies(wanted)
        layer = self.plan.steps[start].module
        old = self.store.take() if self.store is not None else None
        values = z = None
        if old is not None and old.get("graph") and old["start"] == start and \
                old["x"] is x and old["version"] == x._version and old["wanted"] == wanted and \
                _same(old["prefix"], _snapshot(deps)):
            values = old["values"]
            if old["z"] is not None and _same(old["layer"], _snapshot([layer])):
                z = old["z"]
        del old    # outdated caches are freed before they are rebuilt
        if values is None:
            filled: dict[int, Optional[torch.Tensor]] = {n: None for n in wanted if n >= 0}
            for s in range(0, len(x), self.chunk):
                for n, v in self.plan.values(x[s:s + self.chunk], wanted).items():
                    if n >= 0:
                        filled[n] = _into(filled[n], v, s, len(x))
            values = {n: (x.contiguous() if n < 0 else filled[n]) for n in wanted}
            del filled
        self.x = values[x_node]
        self.z = z if z is not None else self._build_z(start)
        self.prog = prog.with_sides(values)
        self._graph = dict(start=start, x=x, version=x._version, wanted=wanted, values=values,
                           deps=deps, layer=layer)
        self.y = y

    def _from_stash(self, start: int, x: torch.Tensor, prefix) -> Optional[torch.Tensor]:
        """``X_d`` kept by an earlier build, if it is still exact; drops what the cycle has
        passed (deeper layers)."""
        if self.store is None:
            return None
        stash = self.store.stash
        for k in [k for k in stash if k >= start]:
            entry = stash.pop(k)
            if k == start and entry["key"][0] is x and entry["key"][1] == x._version and \
                    _same(entry["prefix"], _snapshot(prefix)):
                return entry["x"]
        return None

    def _build_input(self, start: int, x: torch.Tensor) -> torch.Tensor:
        """``X_d`` from the data through the children before ``start``, in chunks; keeps the
        inputs of the stash points on the way."""
        stops = []
        if self.store is not None and self.store.stashing:
            self.store.stash.clear()
            stops = sorted(self.plan.stash_points(start))
        bounds = stops + [start]
        runs = [self._forward(a, b) for a, b in zip([0] + bounds[:-1], bounds)]
        outs: list[Optional[torch.Tensor]] = [None] * len(bounds)
        for s in range(0, len(x), self.chunk):
            h = x[s:s + self.chunk]
            for j, run in enumerate(runs):
                h = run(h)
                outs[j] = _into(outs[j], h, s, len(x))
        children = [s.module for s in self.plan.steps]
        for b, out in zip(stops, outs):
            self.store.stash[b] = dict(key=(x, x._version), prefix=_snapshot(children[:b]),
                                       x=out)
        return outs[-1]

    def _forward(self, begin: int, stop: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Children ``begin .. stop-1`` as one function: the compiled program forward on the
        CPU (hand-written passes for BatchNorm, ReLU, pooling and one-channel convolutions),
        the modules elsewhere."""
        modules = torch.nn.Sequential(*[s.module for s in self.plan.steps[begin:stop]])
        prog = self.plan.forward_program(begin, stop)
        # the caller keeps h (a stash entry): an in-place module must not write over it
        inplace = any(getattr(m, "inplace", False) for m in modules)

        def run(h: torch.Tensor) -> torch.Tensor:
            if len(prog) == 0 or h.device.type != "cpu":
                return modules(h.clone() if inplace else h)
            return ops.program_forward(h, prog)
        return run

    def _build_z(self, start: int) -> torch.Tensor:
        """``Z_d``: the swept layer (step ``start``) over the cached ``X_d``, in chunks (the
        compiled program forward for a sequential plan, the module for a traced graph)."""
        layer = self.plan.steps[start].module if self.plan.dag else self._forward(start, start + 1)
        return self._chunked(layer, self.x)

    def _unit_moves_z(self) -> bool:
        """Whether the swept unit's weights are those of the layer ``Z_d`` is the output of
        (not so for a BatchNorm unit after it)."""
        return self.unit.module is self.plan.steps[self._start()].module

    def _chunked(self, f: Callable, x: torch.Tensor) -> torch.Tensor:
        out = None
        for s in range(0, len(x), self.chunk):
            out = _into(out, f(x[s:s + self.chunk]), s, len(x))
        return out

    def end(self) -> None:
        """Drop the caches, or hand them to the store with the state they are exact for.

        ``Z_d`` is handed on only if this sweep did not move the layer's own weights: the sweep
        kept it exact move by move, but in another rounding than a fresh build, and a run
        resumed from a checkpoint builds it fresh. Rebuilding it (one layer over the pool) keeps
        a resumed run bitwise equal to an uninterrupted one."""
        if self.x is not None and self._unit_moves_z():
            self.z = None
        graph = getattr(self, "_graph", None)
        if graph is not None:
            if self.store is not None and self.x is not None:
                self.store.put(graph=True, start=graph["start"], x=graph["x"],
                               version=graph["version"], wanted=graph["wanted"],
                               values=graph["values"], z=self.z,
                               prefix=_snapshot(graph["deps"]),
                               layer=_snapshot([graph["layer"]]))
            self._graph = None
        elif self.store is not None and self.x is not None:
            children = [s.module for s in self.plan.steps]
            start = self._key[0]
            self.store.put(key=self._key, x=self.x, z=self.z,
                           prefix=_snapshot(children[:start]), layer=_snapshot([children[start]]))
        self.x = self.z = self.y = None

    def _start(self) -> int:
        """Index of the swept layer among the plan's steps."""
        graph = getattr(self, "_graph", None)
        return graph["start"] if graph is not None else self._key[0]

    def cache_bytes(self) -> int:
        """Bytes held by the caches of this sweep."""
        held = [self.x, self.z]
        graph = getattr(self, "_graph", None)
        if graph is not None:   # the side inputs (X_d is one of the values)
            held = [self.z, *graph["values"].values()]
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def memory_estimate(self, model: nn.Module, unit_module: nn.Module, pool_size: int,
                        batch_size: int, trace: Sequence[ModuleFootprint]) -> tuple[int, str]:
        """(bytes, description) of this sweep on ``pool_size`` samples (:func:`fused_sweep_estimate`
        for the layer that owns the unit; a traced graph's also counts its side inputs and the
        values its program keeps in slots)."""
        owner = self.plan.steps[self.plan.owner(self.unit)].module
        if not self.plan.dag:
            param = self.unit.param
            states = 0 if self.unit.param_name != "weight" else left_out_state_bytes(
                trace, owner, param.numel() // param.shape[0], pool_size, batch_size)
            return fused_sweep_estimate(trace, owner, pool_size, batch_size,
                                        candidates=self.candidates, state_bytes=states)
        size = next(owner.parameters()).element_size()
        side, saved = self.plan.side_widths(self.unit)
        return fused_sweep_estimate(trace, owner, pool_size, batch_size,
                                    candidates=self.candidates, side_bytes=side * size,
                                    saved_bytes=saved * size)

    # -- the sweep ----------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, k0: int, k1: int, streams: SweepStreams, decay: float,
            tick: Optional[Callable[[int], Optional[bool]]] = None) -> tuple[int, float]:
        """Visit weights ``k0 .. k1-1``; returns (accepted moves, sum of winning losses);
        ``tick`` as in :class:`rso_ext.sweep.Sweeper`, after each call of the op."""
        param = self.unit.param.data
        fan_in = max(1, param.numel() // param.shape[0])
        step = max(1, min(self.max_chunk, fan_in * max(1, 512 // fan_in)))
        accepted, loss_sum = 0, 0.0
        dev = self.x.device
        for a in range(k0, k1, step):
            b = min(k1, a + step)
            values = candidate_values(param.view(-1)[a:b], _staged(streams.deltas[a:b], dev),
                                      decay, streams.steps)
            batches = streams.batches(a, b)
            lo, hi = distributed.shard(batches.shape[1], "the minibatch size")
            with _across_ranks():
                chosen, losses = ops.fused_sweep(
                    self.x, self.z, param, self.y, self.prog.program,
                    unit_kind=self.prog.unit_kind, unit_op=self.prog.unit_op, k0=a,
                    values=values, batches=_staged(batches[:, lo:hi], dev))
            # read back once; numpy's reductions cost a microsecond where torch's cost several,
            # which a call of a few weights (one neuron of a linear layer) notices
            ch, ls = chosen.cpu().numpy(), losses.cpu().numpy()
            if ch.min() < 0:               # -1: a non-finite state stopped the call
                i = int(np.flatnonzero(ch == -1)[0])
                param.view(-1)[a + i] = values[i, 0]
                raise non_finite(self.unit, a + i, float(ls[i, 0]))
            accepted += int(np.count_nonzero(ch))
            loss_sum += float(ls[np.arange(len(ch)), ch].sum())
            if tick is not None and tick(b):
                break
        return accepted, loss_sum

    # -- per-weight evaluator interface -----------------------------------------------------
    @torch.no_grad()
    def losses(self, k: int, values: torch.Tensor, idx: torch.Tensor,
               target: Optional[torch.Tensor] = None) -> torch.Tensor:
        """float64 [K]: summed losses of weight ``k`` set to each of ``values`` on minibatch
        ``idx`` of the pool (targets are the pool's); over several processes each rank
        evaluates its shard of ``idx`` and the losses are those of the whole minibatch. Changes
        nothing."""
        lo, hi = distributed.shard(len(idx), "the minibatch size")
        with _across_ranks():
            return ops.fused_candidate_losses(
                self.x, self.z, self.unit.param.data, self.y, self.prog.program,
                unit_kind=self.prog.unit_kind, unit_op=self.prog.unit_op, k=k, values=values,
                batch=idx[lo:hi])

    @torch.no_grad()
    def set(self, k: int, value: torch.Tensor) -> None:
        """Write ``value`` as weight ``k`` and keep ``Z_d`` exact."""
        ops.fused_set_weight(
            self.x, self.z, self.unit.param.data, self.prog.program,
            unit_kind=self.prog.unit_kind, unit_op=self.prog.unit_op, k=k, value=float(value))

    @torch.no_grad()
    def set_many(self, ks: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``values`` as weights ``ks`` and rebuild ``Z_d`` (one pass of the layer over
        the pool): what many :meth:`set` calls do, at a fraction of their cost once thousands of
        weights move (the mask search prunes up to a whole layer at the end of a sweep)."""
        flat = self.unit.param.data.view(-1)
        flat[ks.to(flat.device)] = values.to(flat)
        if self._unit_moves_z():               # else Z_d does not depend on this unit
            self.z = self._build_z(self._start())
