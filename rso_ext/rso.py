"""The RSO driver: schedule, sweep order and choice of candidates (Algorithm 1 of arXiv 2005.05955).

One cycle visits every unit of :func:`rso_ext.visit.visit_units` once. For each weight ``w`` of a
unit: ``w' = w * (1 - weight_decay)``; the candidates ``{w', w' + delta, w' - delta}`` are evaluated
on the weight's own minibatch; the lowest summed float64 cross-entropy wins and ties keep ``w'``.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, Optional

import torch
from torch import nn

from . import batchnorm, schedule
from .data import check_data, from_dataset
from .evaluate import make_evaluator
from .sweep import NonFiniteLossError, Sweeper, TorchSweeper
from .streams import SAMPLERS, SweepStreams
from .visit import Unit, execution_order, visit_units

BACKENDS = ("torch",)
STATE_FORMAT = 1


@dataclass
class SweepStats:
    """What one sweep over one unit (a parameter tensor) did."""

    cycle: int            # 0-based
    unit: int             # index of the unit in visiting order
    layer: str            # "module.param"
    weights: int          # weights visited
    accepted: int         # visits where a perturbed candidate won
    mean_loss: float      # mean over visits of the winning summed loss / batch size
    sigma: float          # annealed sigma used for this sweep
    seconds: float
    cycle_done: bool      # last unit of the cycle

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


class RSO:
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
        backend: how candidates are evaluated; ``"torch"`` is the pure-PyTorch reference.
    """

    def __init__(self, model: nn.Module, *, cycles: int = 50, batch_size: int = 5000,
                 alpha: float = 0.1, weight_decay: float = 1e-4, sampler: str = "shuffle",
                 sigma: str = "he", sample_scale: float = 1.0,
                 bn_sigma: float = schedule.BN_SIGMA, calib_size: int = 2000,
                 generator: Optional[torch.Generator] = None, backend: str = "torch") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if cycles < 1:
            raise ValueError(f"cycles must be >= 1, got {cycles}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not 0.0 <= weight_decay < 1.0:
            raise ValueError(f"weight_decay must be in [0, 1), got {weight_decay}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if sigma not in schedule.SIGMA_MODES:
            raise ValueError(f"sigma must be one of {schedule.SIGMA_MODES}, got {sigma!r}")
        if calib_size < 1:
            raise ValueError(f"calib_size must be >= 1, got {calib_size}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError("generator must be a CPU torch.Generator (the streams are drawn on "
                             f"the CPU), got one on {generator.device}")
        self.model = model
        self.hparams = dict(cycles=cycles, batch_size=batch_size, alpha=alpha,
                            weight_decay=weight_decay, sampler=sampler, sigma=sigma,
                            sample_scale=sample_scale, bn_sigma=bn_sigma, calib_size=calib_size,
                            backend=backend)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.cycle = 0
        self.unit = 0
        self.calib_idx: Optional[torch.Tensor] = None
        self.units: Optional[list[Unit]] = None
        self.sigma0: Optional[list[float]] = None

    # -- set-up -----------------------------------------------------------------------------
    def _prepare(self, x: torch.Tensor) -> None:
        if self.units is None:
            sample = x[:2]
            self.units = visit_units(self.model, sample)
            self._order = [m for _, m in execution_order(self.model, sample)]
            if self.sigma0 is None:
                h = self.hparams
                self.sigma0 = [schedule.base_sigma(u.module, u.param_name, u.param, h["sigma"],
                                                   h["sample_scale"], h["bn_sigma"])
                               for u in self.units]
        if self.calib_idx is None:
            n = min(self.hparams["calib_size"], len(x))
            self.calib_idx = torch.randperm(len(x), generator=self.generator)[:n]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _data(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        if y is None:
            x, y = from_dataset(x)
        check_data(x, y, num_classes=self._num_classes(x[:2]), name="training data")
        if not torch.is_floating_point(x):
            raise TypeError(f"training images must be a floating-point tensor, got {x.dtype}")
        if self.hparams["batch_size"] > len(x):
            raise ValueError(f"batch_size={self.hparams['batch_size']} is larger than the "
                             f"training set ({len(x)} samples)")
        dev = self.device
        return x.to(dev, self.param_dtype), y.to(dev)

    @torch.no_grad()
    def _num_classes(self, sample: torch.Tensor) -> int:
        was_training = self.model.training
        try:
            out = self.model.eval()(sample.to(self.device, self.param_dtype))
        finally:
            self.model.train(was_training)
        if out.dim() != 2:
            raise ValueError(f"the model must return logits of shape [batch, classes], got "
                             f"{tuple(out.shape)}")
        return out.shape[1]

    @property
    def param_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- the search ---------------------------------------------------------------------------
    def run(self, x, y: Optional[torch.Tensor] = None, *,
            progress: bool = False) -> Iterator[SweepStats]:
        """Run the remaining cycles on training data ``(x, y)`` (tensors) or on ``x`` alone as a
        Dataset/DataLoader of (image, label) pairs. Yields one :class:`SweepStats` per unit sweep;
        :meth:`state_dict` taken at a yield resumes right after that sweep."""
        x, y = self._data(x, y)
        self._prepare(x)
        assert self.units is not None and self.sigma0 is not None
        cycles = self.hparams["cycles"]
        bar = _progress(total=cycles * len(self.units), initial=self.cycle * len(self.units)
                        + self.unit, desc="layers", enabled=progress)
        try:
            while self.cycle < cycles:
                stats = self._sweep(self.unit, x, y, progress)
                self.unit += 1
                if self.unit == len(self.units):
                    self.unit, self.cycle = 0, self.cycle + 1
                bar.set_postfix(layer=stats.layer, loss=f"{stats.mean_loss:.4f}")
                bar.update(1)
                yield stats
        finally:
            bar.close()

    def sweep_unit(self, index: int, x, y: Optional[torch.Tensor] = None, *,
                   weights: Optional[int] = None, sweeper: Optional[Sweeper] = None,
                   progress: bool = False) -> SweepStats:
        """Sweep unit ``index`` once at the current cycle's sigma, drawing its streams from the
        generator, without moving the position; for experiments and benchmarks.

        ``weights`` visits only the first that many weights of the unit; ``sweeper`` replaces the
        backend's weight loop (see :mod:`rso_ext.sweep`), built for ``self.units[index]``."""
        x, y = self._data(x, y)
        self._prepare(x)
        if not 0 <= index < len(self.units):
            raise IndexError(f"unit index {index} out of range (the model has "
                             f"{len(self.units)} units)")
        return self._sweep(index, x, y, progress, weights, sweeper)

    @torch.no_grad()
    def _sweep(self, index: int, x: torch.Tensor, y: torch.Tensor, progress: bool,
               weights: Optional[int] = None, sweeper: Optional[Sweeper] = None) -> SweepStats:
        h = self.hparams
        t0 = time.perf_counter()
        unit = self.units[index]
        n = unit.param.numel() if weights is None else min(weights, unit.param.numel())
        sigma = schedule.annealed(self.sigma0[index], self.cycle, h["cycles"], h["alpha"])
        streams = SweepStreams.draw(self.generator, unit.param.numel(), sigma, len(x),
                                    h["batch_size"],
                                    h["sampler"])
        if batchnorm.has_batchnorm(self.model):
            batchnorm.calibrate(self.model, x[self.calib_idx.to(x.device)])
        sweeper = sweeper or self.sweeper(unit)
        with batchnorm.search_mode(self.model, self._order, unit.position):
            sweeper.begin(x, y)
            bar = _progress(total=n, desc=unit.name, enabled=progress, leave=False)
            try:
                accepted, loss_sum = sweeper.run(0, n, streams, 1.0 - h["weight_decay"],
                                                 tick=lambda k: bar.update(k - bar.n))
            except NonFiniteLossError as e:
                raise NonFiniteLossError(f"cycle {self.cycle}: {e}") from None
            finally:
                bar.close()
                sweeper.end()
        return SweepStats(self.cycle, index, unit.name, n, accepted,
                          loss_sum / n / h["batch_size"], sigma, time.perf_counter() - t0,
                          index == len(self.units) - 1)

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> nn.Module:
        """Recompute BatchNorm statistics on the calibration images of training set ``x`` and put
        the model in eval mode, ready for evaluation."""
        x = x.to(self.device, self.param_dtype)
        self._prepare(x)
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
        diff = {k: (v, self.hparams.get(k)) for k, v in state["hparams"].items()
                if self.hparams.get(k) != v}
        if diff:
            raise ValueError("the checkpoint was made with other hyperparameters "
                             + ", ".join(f"{k}: saved {a!r} vs {b!r}" for k, (a, b) in diff.items()))
        self.model.load_state_dict(state["model"])
        self.generator.set_state(state["generator"])
        self.cycle, self.unit = int(state["cycle"]), int(state["unit"])
        self.sigma0 = state.get("sigma0")
        self.calib_idx = state.get("calib_idx")

    def sweeper(self, unit: Unit) -> Sweeper:
        """The weight loop of this object's backend for ``unit``."""
        return TorchSweeper(unit, make_evaluator(self.model, unit))

    @property
    def done(self) -> bool:
        return self.cycle >= self.hparams["cycles"]


class _NoBar:
    n = 0

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **_: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool, initial: int = 0, leave: bool = True):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, leave=leave, dynamic_ncols=True)
