"""The RSO driver: schedule, sweep order and choice of candidates (Algorithm 1 of arXiv 2005.05955).

One cycle visits every unit of :func:`rso_ext.visit.visit_units` once. For each weight ``w`` of a
unit: ``w' = w * (1 - weight_decay)``; the candidates ``{w', w' + delta, w' - delta}`` are evaluated
on the weight's own minibatch; the lowest summed loss wins (float64; by default the summed
cross-entropy, see :mod:`rso_ext.losses`) and ties keep ``w'``.

Two variants of the recipe, off by default: ``candidate_steps=(1, 2)`` also tries ``w' +- 2 delta``
(K = 5 candidates per weight), and ``batch_start=B0`` makes cycle c use minibatches of
``min(batch_size, B0 * 2**c)`` samples (cheap, noisy cycles first).
"""
from __future__ import annotations

import logging
import math
import numbers
import time
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn

from . import batchnorm, distributed, memory, schedule
from .checks import (check_at_least, check_choice, check_finite_nonneg, check_generator,
                     check_model, check_range, check_types)
from .contract import Method, Stats, check_hparams, progress_bar, register
from .data import check_data, from_dataset
from .evaluate import make_evaluator
from .fused import CacheStore, FusedSweeper, GraphPlan, Plan, PlanError, lower
from .losses import Loss, check_loss, describe, is_cross_entropy, resolve
from .precision import PRECISIONS, precision as precision_mode
from .sweep import NonFiniteLossError, Sweeper, TorchSweeper
from .streams import SAMPLERS, SweepStreams
from .visit import Unit, check_supported, execution_order, visit_units

logger = logging.getLogger("rso_ext")

BACKENDS = ("auto", "fused", "torch")
STATE_FORMAT = 1


def check_candidate_steps(steps: Sequence[float]) -> tuple[float, ...]:
    """``candidate_steps`` as a tuple of floats, or ValueError naming what is wrong."""
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence):
        raise TypeError(f"candidate_steps must be a sequence of numbers such as (1.0, 2.0), "
                        f"got {steps!r}")
    out = []
    for s in steps:
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s) or \
                s <= 0:
            raise ValueError(f"candidate_steps must hold finite positive multiples of delta, "
                             f"got {s!r} in {tuple(steps)!r}")
        out.append(float(s))
    if not out or len(set(out)) != len(out):
        raise ValueError(f"candidate_steps must hold at least one multiple, each once, got "
                         f"{tuple(steps)!r}")
    return tuple(out)


#: the statistics of a unit sweep: the one :class:`rso_ext.contract.Stats` of every method (the
#: old name, kept)
SweepStats = Stats


@register
class RSO(Method):
    """Random search optimisation of ``model``'s conv/linear/BatchNorm parameters.

    Args:
        model: any ``nn.Module`` whose parameters belong to Conv2d, Linear or BatchNorm layers.
        cycles: number of cycles C (used by the annealing schedule).
        batch_size: minibatch size B per weight.
        alpha: final fraction of sigma reached by linear annealing.
        weight_decay: each visited weight is multiplied by ``1 - weight_decay`` first.
        sampler: ``"shuffle"`` or ``"random"`` (see :mod:`rso_ext.streams`).
        sigma: ``"he"`` (``sqrt(2/fan_in)``) or ``"empirical"`` (std of the weights now).
        sample_scale: multiplies the weights' sigma.
        bn_sigma: sigma of BatchNorm gamma and beta.
        calib_size: training images used to recompute BatchNorm statistics.
        generator: the source of all randomness (a CPU ``torch.Generator``); default seed 0.
        backend: how candidates are evaluated: ``"torch"`` is the pure-PyTorch reference (any
            model), ``"fused"`` the compiled fused evaluation (models :func:`rso_ext.fused.lower`
            can lower; others raise :class:`rso_ext.fused.PlanError` naming the module), ``"auto"``
            (the default) fused whenever the model can be lowered, else torch;
            :attr:`backend_reason` says which one runs and why once data has been seen.
        pool_size: if smaller than the training set, each unit sweep draws this many training
            samples (from the generator, before its streams) and searches on them only; it
            bounds the memory of the caches.
        memory_limit: bytes a unit sweep may use on the device; default: what the device has
            available (:mod:`rso_ext.memory`). A sweep whose estimated caches exceed it stops
            with :class:`rso_ext.memory.InsufficientMemoryError` before it starts.
        loss: the loss minimised, a callable ``(logits [K, B, C], target [B]) -> float64 [K]``
            summed over the minibatch (:mod:`rso_ext.losses`); default: cross-entropy. The fused
            backend computes cross-entropy only: with another loss ``backend="auto"`` runs on
            torch (``backend_reason`` says so) and ``backend="fused"`` is refused.
        precision: ``"exact"`` (float32 convolutions and matmuls without TF32 while sweeping,
            so a GPU makes the CPU's decisions) or ``"tf32"`` (tensor cores on CUDA); nothing
            changes on the CPU (:mod:`rso_ext.precision`).
        candidate_steps: the multiples of delta tried on each side of ``w'``: ``(1.0,)`` (the
            paper's three candidates) by default; ``(1.0, 2.0)`` tries ``w' +- delta`` and
            ``w' +- 2 delta`` (five candidates per weight).
        batch_start: the first cycle's minibatch size, doubled every cycle up to ``batch_size``
            (cycle c uses ``min(batch_size, batch_start * 2**c)``); default: ``batch_size`` in
            every cycle, as the paper.
    """

    method = "rso"
    summary = "random search: each weight tries {w', w'+d, w'-d} and keeps the lowest loss"
    kind = "per-weight"
    cli_options = {o: o for o in ("cycles", "batch_size", "calib_size", "alpha", "weight_decay",
                                  "sampler", "sigma", "sample_scale", "backend", "pool_size",
                                  "precision", "candidate_steps", "batch_start")}
    #: candidates evaluated per visited weight (for the evaluation count)
    candidates = 3

    def __init__(self, model: nn.Module, *, cycles: int = 50, batch_size: int = 5000,
                 alpha: float = 0.1, weight_decay: float = 1e-4, sampler: str = "shuffle",
                 sigma: str = "he", sample_scale: float = 1.0,
                 bn_sigma: float = schedule.BN_SIGMA, calib_size: int = 2000,
                 generator: Optional[torch.Generator] = None, backend: str = "auto",
                 pool_size: Optional[int] = None, memory_limit: Optional[int] = None,
                 loss: Optional[Loss] = None, precision: str = "exact",
                 candidate_steps: Sequence[float] = (1.0,),
                 batch_start: Optional[int] = None) -> None:
        check_model(model)
        check_types(cycles=(cycles, int), batch_size=(batch_size, int),
                    calib_size=(calib_size, int), alpha=(alpha, float),
                    weight_decay=(weight_decay, float), sample_scale=(sample_scale, float),
                    bn_sigma=(bn_sigma, float), sampler=(sampler, str), sigma=(sigma, str),
                    backend=(backend, str))
        if pool_size is not None:
            check_types(pool_size=(pool_size, int))
        if batch_start is not None:
            check_types(batch_start=(batch_start, int))
            check_range("batch_start", batch_start, 1, batch_size)
        steps = check_candidate_steps(candidate_steps)
        if memory_limit is not None:
            check_types(memory_limit=(memory_limit, int))
            check_at_least("memory_limit", memory_limit, 0, " bytes")
        for name, v in (("sample_scale", sample_scale), ("bn_sigma", bn_sigma)):
            check_finite_nonneg(name, v)
        check_at_least("cycles", cycles, 1)
        check_at_least("batch_size", batch_size, 1)
        check_range("alpha", alpha, 0, 1)
        check_range("weight_decay", weight_decay, 0, 1, hi_open=True)
        check_choice("sampler", sampler, SAMPLERS)
        check_choice("sigma", sigma, schedule.SIGMA_MODES)
        check_at_least("calib_size", calib_size, 1)
        if pool_size is not None and pool_size < batch_size:
            raise ValueError(f"pool_size={pool_size} must be at least batch_size={batch_size}")
        check_choice("backend", backend, BACKENDS)
        check_choice("precision", precision, PRECISIONS)
        check_generator(generator)
        check_loss(loss)
        if backend == "fused" and not is_cross_entropy(loss):
            raise ValueError(f"backend='fused' computes the summed cross-entropy only; "
                             f"loss={describe(loss)} needs backend='torch' (or 'auto')")
        self.model = model
        self.hparams = dict(cycles=cycles, batch_size=batch_size, alpha=alpha,
                            weight_decay=weight_decay, sampler=sampler, sigma=sigma,
                            sample_scale=sample_scale, bn_sigma=bn_sigma, calib_size=calib_size,
                            backend=backend, pool_size=pool_size)
        # recorded only when not the default (checkpoints made before the option load as is)
        if not is_cross_entropy(loss):
            self.hparams["loss"] = describe(loss)
        if steps != (1.0,):
            self.hparams["candidate_steps"] = steps
            self.candidates = 1 + 2 * len(steps)     # evaluated per visited weight (K)
        if batch_start is not None:
            self.hparams["batch_start"] = batch_start
        self.loss = resolve(loss)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.cycle = 0
        self.unit = 0
        self.evaluations = 0
        self.calib_idx: Optional[torch.Tensor] = None
        self.units: Optional[list[Unit]] = None
        self.sigma0: Optional[list[float]] = None
        self.plan: Optional[Union[Plan, GraphPlan]] = None
        self.backend_reason = ""
        self.memory_limit = memory_limit
        self.precision = precision   # of cuDNN/cuBLAS float32 work while sweeping (CUDA only)
        self._footprint: Optional[tuple[torch.Size, list]] = None
        # fused: caches handed from a layer's unit to the next, and shallower layers' inputs
        self._caches = CacheStore(stash=pool_size is None)

    # -- set-up -----------------------------------------------------------------------------
    def _prepare(self, x: torch.Tensor) -> None:
        if self.units is None:
            sample = x[:2]
            self.units = visit_units(self.model, sample)
            self._order = [m for _, m in execution_order(self.model, sample)]
            asked = self.hparams["backend"]
            self.backend_reason = "torch: asked for with backend='torch'"
            if asked != "torch" and "loss" in self.hparams:
                self.backend_reason = (f"torch: loss={self.hparams['loss']} is not the "
                                       "cross-entropy the fused kernels compute")
                logger.info("rso_ext backend %s", self.backend_reason)
            elif asked == "auto" and distributed.active():
                self.backend_reason = ("torch: backend='auto' and a process group of "
                                       f"{distributed.world()[1]} ranks is active (the fused "
                                       "backend runs over several processes through its "
                                       "device-generic passes only: ask for it with "
                                       "backend='fused')")
                logger.info("rso_ext backend %s", self.backend_reason)
            elif asked != "torch":
                try:
                    plan = lower(self.model, sample)
                    if plan.dag:      # a traced graph: refuse a unit it cannot sweep now
                        plan.check_units(self.units)
                    self.plan = plan
                    self.backend_reason = (f"fused: asked for with backend={asked!r}"
                                           if asked == "fused" else
                                           "fused: backend='auto' and the model lowers")
                except PlanError as e:
                    if asked == "fused":
                        raise
                    self.backend_reason = f"torch: backend='auto' but the fused path cannot " \
                                          f"lower the model ({e})"
                logger.info("rso_ext backend %s", self.backend_reason)
            if self.sigma0 is None:
                h = self.hparams
                self.sigma0 = [schedule.base_sigma(u.module, u.param_name, u.param, h["sigma"],
                                                   h["sample_scale"], h["bn_sigma"])
                               for u in self.units]
        if self.calib_idx is None:
            n = min(self.hparams["calib_size"], len(x))
            self.calib_idx = torch.randperm(len(x), generator=self.generator)[:n]

    def _data(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        if self.units is None:
            check_supported(self.model)            # name an unsupported module before any forward
        if y is None:
            x, y = from_dataset(x)
        check_data(x, y, num_classes=self._num_classes(x[:2]), name="training data")
        if not torch.is_floating_point(x):
            raise TypeError(f"training images must be a floating-point tensor, got {x.dtype}")
        if self.hparams["batch_size"] > len(x):
            raise ValueError(f"batch_size={self.hparams['batch_size']} is larger than the "
                             f"training set ({len(x)} samples)")
        b = self.hparams["batch_size"]      # each rank takes a share of every minibatch
        distributed.check_split(b, f"batch_size={b}", x, y, first=self.units is None)
        b0 = self.hparams.get("batch_start")
        if b0 is not None:                  # (then every b0 * 2**c splits too)
            distributed.check_split(b0, f"batch_start={b0}", x, y, first=False)
        dev = self.device
        return x.to(dev, self.param_dtype), y.to(dev, torch.long)

    @torch.no_grad()
    def _num_classes(self, sample: torch.Tensor) -> int:
        was_training = self.model.training
        try:
            out = self.model.eval()(sample.to(self.device, self.param_dtype))
        except (RuntimeError, ValueError, IndexError) as e:
            raise ValueError(f"the model cannot run on training images of shape "
                             f"{tuple(sample.shape[1:])} (dtype {sample.dtype}): {e}") from None
        finally:
            self.model.train(was_training)
        if out.dim() != 2:
            raise ValueError(f"the model must return logits of shape [batch, classes], got "
                             f"{tuple(out.shape)}")
        return out.shape[1]

    # -- the search ---------------------------------------------------------------------------
    def _advance(self, x: torch.Tensor, y: torch.Tensor, progress: bool) -> Stats:
        """Sweep the unit at the current position and move to the next."""
        assert self.units is not None and self.sigma0 is not None
        with precision_mode(self.precision):
            stats = self._sweep(self.unit, x, y, progress)
        if stats.weights < self.units[self.unit].param.numel():
            return stats                  # stopped early (run(stop=)): sweep this unit again
        self.unit += 1
        if self.unit == len(self.units):
            self.unit, self.cycle = 0, self.cycle + 1
        return stats

    def _progress(self) -> tuple[int, int, str]:
        n = len(self.units)
        return self.hparams["cycles"] * n, self.cycle * n + self.unit, "layers"

    def _postfix(self, stats: Stats) -> Dict[str, str]:
        return {"layer": stats.layer, "loss": f"{stats.mean_loss:.4f}"}

    def sweep_unit(self, index: int, x, y: Optional[torch.Tensor] = None, *,
                   weights: Optional[int] = None, sweeper: Optional[Sweeper] = None,
                   progress: bool = False) -> Stats:
        """Sweep unit ``index`` once at the current cycle's sigma, drawing its streams from the
        generator, without moving the position; for experiments and benchmarks.

        ``weights`` visits only the first that many weights of the unit; ``sweeper`` replaces the
        backend's weight loop (see :mod:`rso_ext.sweep`), built for ``self.units[index]``."""
        x, y = self._data(x, y)
        self._prepare(x)
        if not 0 <= index < len(self.units):
            raise IndexError(f"unit index {index} out of range (the model has "
                             f"{len(self.units)} units)")
        with precision_mode(self.precision):
            return self._sweep(index, x, y, progress, weights, sweeper)

    @torch.no_grad()
    def _sweep(self, index: int, x: torch.Tensor, y: torch.Tensor, progress: bool,
               weights: Optional[int] = None, sweeper: Optional[Sweeper] = None) -> Stats:
        h = self.hparams
        t0 = time.perf_counter()
        unit = self.units[index]
        b = self.batch_size(self.cycle)
        n = unit.param.numel() if weights is None else min(weights, unit.param.numel())
        sigma = schedule.annealed(self.sigma0[index], self.cycle, h["cycles"], h["alpha"])
        if batchnorm.has_batchnorm(self.model):
            batchnorm.calibrate(self.model, x[self.calib_idx.to(x.device)])
        if h["pool_size"] is not None and h["pool_size"] < len(x):
            pool = torch.randperm(len(x), generator=self.generator)[:h["pool_size"]].to(x.device)
            x, y = x[pool], y[pool]
        streams = SweepStreams.draw(self.generator, unit.param.numel(), sigma, len(x), b,
                                    h["sampler"], h.get("candidate_steps", (1.0,)))
        sweeper = sweeper or self.sweeper(unit)
        self._check_memory(unit, sweeper, x, b)
        with batchnorm.search_mode(self.model, self._order, unit.position), \
                distributed.whole_batch_norm(self.model):     # a sharded minibatch's statistics
            sweeper.begin(x, y)
            bar = progress_bar(total=n, desc=unit.name, enabled=progress, leave=False)
            stop, reached = self._stop, [n]

            def tick(k: int) -> bool:
                bar.update(k - bar.n)
                if stop is not None and k < n and stop():
                    reached[0] = k
                    return True
                return False
            try:
                accepted, loss_sum = sweeper.run(0, n, streams, 1.0 - h["weight_decay"],
                                                 tick=tick)
            except NonFiniteLossError as e:
                raise NonFiniteLossError(f"cycle {self.cycle}: {e}") from None
            finally:
                bar.close()
                sweeper.end()
                nxt = index + 1
                if self.plan is None or nxt == len(self.units) or \
                        self.plan.owner(self.units[nxt]) != self.plan.owner(unit):
                    self._caches.take()   # the next unit sweeps another layer: free them now
        n = reached[0]                    # fewer than asked where stop() ended the sweep
        self.evaluations += n * self.candidates * b
        return Stats(method=self.method, cycle=self.cycle,
                     step=self.cycle * len(self.units) + index, layer=unit.name,
                     evaluations=self.evaluations,
                     mean_loss=loss_sum / n / b, sigma=sigma,
                     seconds=time.perf_counter() - t0,
                     cycle_done=index == len(self.units) - 1 and n == unit.param.numel(),
                     unit=index, weights=n, accepted=accepted)

    def batch_size(self, cycle: int) -> int:
        """The minibatch size of cycle ``cycle`` (0-based): ``batch_size``, or with
        ``batch_start`` that doubled every cycle up to ``batch_size``."""
        h = self.hparams
        start = h.get("batch_start")
        if start is None:
            return h["batch_size"]
        return min(h["batch_size"], start << min(cycle, 62))

    def _check_memory(self, unit: Unit, sweeper: Sweeper, x: torch.Tensor,
                      b: Optional[int] = None) -> None:
        """Stop before a unit sweep whose caches would not fit in the device's memory (at
        minibatches of ``b`` samples; default the largest, ``batch_size``)."""
        sample = x[:2]
        if self._footprint is None or self._footprint[0] != sample.shape[1:]:
            self._footprint = (sample.shape[1:], memory.trace_footprint(self.model, sample))
        b = self.hparams["batch_size"] if b is None else b
        est = memory.sweep_estimate(self.model, unit.module, sweeper, len(x), b,
                                    trace=self._footprint[1])
        if est is None:
            return
        total, detail = est
        memory.check_fits(
            total, x.device, f"the sweep of {unit.name!r} ({detail})",
            f"lower the batch size (batch_size / --batch-size, now {b}) or the number of "
            f"training samples per sweep (pool_size / --pool-size, or --train-size; now "
            f"{len(x)})", limit=self.memory_limit)

    def check(self, x, y: Optional[torch.Tensor] = None) -> None:
        """Raise now what :meth:`run` would raise before its first sweep on training data
        ``(x, y)`` (bad data, batch size, a model it cannot sweep, memory that would not fit),
        changing neither the weights nor the generator."""
        x, y = self._data(x, y)
        state, calib = self.generator.get_state(), self.calib_idx
        try:
            self._prepare(x)
            pool = x if self.hparams["pool_size"] is None else x[:self.hparams["pool_size"]]
            for unit in self.units:
                self._check_memory(unit, self.sweeper(unit), pool)
        finally:
            self.generator.set_state(state)
            self.calib_idx = calib

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> nn.Module:
        """Recompute BatchNorm statistics on the calibration images of training set ``x`` and put
        the model in eval mode, ready for evaluation."""
        x = x.to(self.device, self.param_dtype)
        self._prepare(x)
        with precision_mode(self.precision):
            return batchnorm.calibrate(self.model, x[self.calib_idx.to(x.device)])

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Weights, generator state, position (cycle, unit) and hyperparameters."""
        return {
            "format": STATE_FORMAT,
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "generator": self.generator.get_state(),
            "cycle": self.cycle,
            "unit": self.unit,
            "sigma0": self.sigma0,
            "calib_idx": self.calib_idx,
            "evaluations": self.evaluations,
            "hparams": dict(self.hparams),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the hyperparameters must match this object's."""
        missing = {"format", "model", "generator", "cycle", "unit", "hparams"} - set(state)
        if missing:
            raise ValueError(f"not an RSO state dict: missing {sorted(missing)}")
        if state["format"] != STATE_FORMAT:
            raise ValueError(f"RSO state format {state['format']} is not supported "
                             f"(this version reads format {STATE_FORMAT})")
        check_hparams(state["hparams"], self.hparams,
                      always=("loss", "candidate_steps", "batch_start"))
        self.model.load_state_dict(state["model"])
        self.generator.set_state(state["generator"])
        self.cycle, self.unit = int(state["cycle"]), int(state["unit"])
        self.sigma0 = state.get("sigma0")
        self.calib_idx = state.get("calib_idx")
        self.evaluations = int(state.get("evaluations", 0))

    @property
    def backend(self) -> str:
        """The backend in use: ``"fused"`` or ``"torch"`` (``"auto"`` resolved on first data)."""
        return "fused" if self.plan is not None else "torch"

    def sweeper(self, unit: Unit) -> Sweeper:
        """The weight loop of this object's backend for ``unit``."""
        if self.plan is not None:
            return FusedSweeper(self.plan, unit, store=self._caches, candidates=self.candidates)
        evaluator = make_evaluator(self.model, unit, self.loss)
        if distributed.active():      # each rank on its shard of every minibatch
            evaluator = distributed.ShardedEvaluator(evaluator)
        return TorchSweeper(unit, evaluator, candidates=self.candidates)
