"""Memory check before a unit sweep: estimate what the sweep's caches will take on the device and
stop with a clear message, instead of an out-of-memory crash half-way through a run.

The estimate is backend-neutral arithmetic (:func:`estimate_sweep_bytes`): per-sample bytes
cached for the whole training pool, plus per-sample bytes of the work on one minibatch, plus fixed
bytes. Each sweeper states its own figures through a method ``memory_estimate(model,
unit_module, pool_size, batch_size, trace) -> (bytes, description)`` built on
:func:`estimate_sweep_bytes` and the model's per-module footprint (:func:`trace_footprint`), and
:func:`sweep_estimate` asks it: :class:`rso_ext.sweep.TorchSweeper` with
:func:`torch_sweep_estimate`, :class:`rso_ext.fused.FusedSweeper` with its own figures
(rso_ext/fused/sweeper.py).

:func:`available_bytes` reads what the device can still give (CPU: ``MemAvailable`` of
``/proc/meminfo``, capped by a cgroup limit; CUDA: ``torch.cuda.mem_get_info`` plus the memory the
caching allocator holds unused). The environment variable ``RSO_EXT_MEMORY_LIMIT`` (bytes, or
with a suffix K/M/G/T, powers of 1024) caps that figure, as does ``RSO(memory_limit=...)``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from . import runtime

ENV_LIMIT = "RSO_EXT_MEMORY_LIMIT"
DeviceLike = Union[str, torch.device]

__all__ = ["InsufficientMemoryError", "estimate_sweep_bytes", "available_bytes", "check_fits",
           "format_bytes", "parse_bytes", "trace_footprint", "torch_sweep_estimate",
           "sweep_estimate", "ENV_LIMIT"]


class InsufficientMemoryError(MemoryError):
    """A sweep would need more memory than the device has available (checked before it starts)."""

    def __init__(self, message: str, estimate: int, available: int, device: str) -> None:
        super().__init__(message)
        self.estimate, self.available, self.device = estimate, available, device


# -- figures --------------------------------------------------------------------------------------
def format_bytes(n: float) -> str:
    """``n`` bytes as B/KiB/MiB/GiB/TiB with 3 significant digits."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str) -> int:
    """``"123"``, ``"1.5G"``, ``"512MiB"``, ``"64 kb"`` -> bytes (suffixes are powers of 1024)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(text))
    if not m:
        raise ValueError(f"cannot read {text!r} as a byte count (e.g. 1073741824, 512M, 1.5G)")
    return int(float(m.group(1)) * _SUFFIX[m.group(2).upper()])


def estimate_sweep_bytes(pool_size: int, batch_size: int, cache_bytes_per_sample: int,
                         batch_bytes_per_sample: int, fixed_bytes: int = 0) -> int:
    """Bytes a unit sweep allocates on top of what is already resident: ``pool_size`` samples
    of cache at ``cache_bytes_per_sample`` each, the work on one minibatch of ``batch_size``
    samples at ``batch_bytes_per_sample`` each (all candidates that are alive at once), and
    ``fixed_bytes`` (e.g. index matrices). Every backend states its own per-sample figures."""
    for name, v in (("pool_size", pool_size), ("batch_size", batch_size),
                    ("cache_bytes_per_sample", cache_bytes_per_sample),
                    ("batch_bytes_per_sample", batch_bytes_per_sample),
                    ("fixed_bytes", fixed_bytes)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    return int(pool_size * cache_bytes_per_sample + batch_size * batch_bytes_per_sample
               + fixed_bytes)


# -- what the device has --------------------------------------------------------------------------
def _meminfo_available() -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: str) -> Optional[int]:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None         # "max" (no limit) -> None


def _cgroup_available() -> Optional[int]:
    """Room left under this process's cgroup memory limit (v2, then v1), if there is one."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:
            return max(0, limit - usage)
    return None


def _available(device: DeviceLike) -> tuple[Optional[int], str]:
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        avail, source = int(free + max(0, cached)), "free GPU memory"
    elif device.type == "cpu":
        figures = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
        # plus what this process freed and keeps for reuse (rso_ext.runtime)
        avail, source = ((min(figures) + runtime.heap_free_bytes(), "available RAM")
                         if figures else (None, ""))
    else:
        avail, source = None, ""
    env = os.environ.get(ENV_LIMIT)
    if env:
        cap = parse_bytes(env)
        if avail is None or cap < avail:
            avail, source = cap, f"{ENV_LIMIT}={env}"
    return avail, source


def available_bytes(device: DeviceLike) -> Optional[int]:
    """Bytes the device can still allocate (None where it cannot be told), capped by
    ``RSO_EXT_MEMORY_LIMIT``."""
    return _available(device)[0]


def check_fits(estimate: int, device: DeviceLike, what: str, fix: str,
               limit: Optional[int] = None) -> None:
    """Raise :class:`InsufficientMemoryError` if ``estimate`` bytes exceed what ``device`` has
    available (or ``limit`` bytes, if given and smaller). ``what`` names the work (e.g. "the sweep
    of 'conv1.weight' (...)"), ``fix`` says which setting lowers the need (e.g. "lower
    --batch-size"). Does nothing where the available memory cannot be told."""
    avail, source = _available(device)
    if limit is not None and (avail is None or limit < avail):
        avail, source = int(limit), "memory_limit"
    if avail is None or estimate <= avail:
        return
    dev = str(torch.device(device))
    raise InsufficientMemoryError(
        f"out of memory before starting: {what} needs about {format_bytes(estimate)} on {dev} "
        f"but only {format_bytes(avail)} is available ({source}); {fix}",
        int(estimate), int(avail), dev)


# -- footprints, and the torch backend's figures ------------------------------------------------
@dataclass
class ModuleFootprint:
    """One leaf module of a traced forward: bytes of its input and output per sample."""

    module: nn.Module
    in_bytes: int
    out_bytes: int


def _nbytes(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (tuple, list)):
        return sum(_nbytes(v) for v in t)
    return 0


@torch.no_grad()
def trace_footprint(model: nn.Module, sample: torch.Tensor) -> list[ModuleFootprint]:
    """Leaf modules of ``model(sample)`` in call order with their per-sample input/output bytes
    (eval mode; nothing in the model changes)."""
    n = max(1, len(sample))
    out: list[ModuleFootprint] = []
    hooks = [m.register_forward_hook(
        lambda mod, inp, res: out.append(ModuleFootprint(mod, _nbytes(inp) // n,
                                                         _nbytes(res) // n)))
        for m in model.modules() if not list(m.children())]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        model(sample)
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.train(training)
    return out


def torch_sweep_estimate(trace: Sequence[ModuleFootprint], unit_module: nn.Module,
                         pool_size: int, batch_size: int, cached: bool, candidates: int = 3,
                         batched: bool = False) -> tuple[int, str]:
    """(bytes, description) of a ``backend="torch"`` sweep of a parameter of ``unit_module``.

    ``cached`` (:class:`rso_ext.evaluate.CachedInput`): the swept module's input for the whole
    pool, counted twice (the chunks and their concatenation coexist while it is built), and each
    candidate forward runs from the swept module on; otherwise the whole model runs per
    candidate. A forward without autograd holds its input batch plus, at its peak, one module's
    input and output; ``batched`` (:class:`rso_ext.evaluate.BatchedCandidates`) runs all
    ``candidates`` at once."""
    start = next((i for i, f in enumerate(trace) if f.module is unit_module), 0) if cached else 0
    suffix = list(trace[start:]) or list(trace)
    inp = suffix[0].in_bytes if suffix else 0
    peak = max((f.in_bytes + f.out_bytes for f in suffix), default=0)
    logits = suffix[-1].out_bytes if suffix else 0
    live = candidates if batched else 1
    cache = 2 * inp if cached else 0
    per_batch = inp + live * peak + candidates * logits
    total = estimate_sweep_bytes(pool_size, batch_size, cache, per_batch)
    parts = []
    if cached:
        parts.append(f"cached input {format_bytes(pool_size * cache)} for {pool_size} samples")
    parts.append(f"activations {format_bytes(batch_size * per_batch)} for batch {batch_size}")
    return total, " + ".join(parts)


# -- the sweeper's own figure ---------------------------------------------------------------------
def sweep_estimate(model: nn.Module, unit_module: nn.Module, sweeper, pool_size: int,
                   batch_size: int, trace: Optional[Sequence[ModuleFootprint]] = None,
                   sample: Optional[torch.Tensor] = None) -> Optional[tuple[int, str]]:
    """(bytes, description) of a unit sweep by ``sweeper``, or None if its backend states none.

    A sweeper wrapping another (attribute ``inner``) is looked through; the sweeper answers for
    itself through its method ``memory_estimate(model, unit_module, pool_size, batch_size,
    trace)`` (:class:`rso_ext.sweep.TorchSweeper`, :class:`rso_ext.fused.FusedSweeper`), given
    ``trace`` (or a trace of ``sample``); a sweeper without one gets None."""
    while hasattr(sweeper, "inner") and not hasattr(sweeper, "memory_estimate"):
        sweeper = sweeper.inner
    if not hasattr(sweeper, "memory_estimate"):
        return None
    if trace is None:
        if sample is None:
            raise ValueError("sweep_estimate needs a trace or a sample batch")
        trace = trace_footprint(model, sample)
    return sweeper.memory_estimate(model, unit_module, pool_size, batch_size, trace)
