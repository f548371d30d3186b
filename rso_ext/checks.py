"""Argument checks shared by every search method (:class:`rso_ext.RSO`, :mod:`rso_ext.methods`,
:mod:`rso_ext.optim`): each one raises naming the argument, so a bad value is refused with the
same words wherever it is given.

Kinds: :func:`check_types` (TypeError: not an integer / number / string; a bool is not a number),
:func:`check_int` (ValueError: not an int in a range), :func:`check_at_least`, :func:`check_range`
(numbers), :func:`check_choice` (one of a few values), :func:`check_model`,
:func:`check_generator`, :func:`check_pool_and_batch` (the closure contract of the optimizers).
Method-specific rules (ES's even population, GA's elite and parents) live with their method and
are built from these.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence

import torch
from torch import nn

__all__ = ["check_types", "check_choice", "check_range", "check_int", "check_at_least",
           "check_finite_nonneg", "check_model", "check_generator", "check_pool_and_batch"]

_KINDS = {int: (numbers.Integral, "an integer"), float: (numbers.Real, "a number"),
          str: (str, "a string")}


def check_types(**args: tuple[Any, type]) -> None:
    """TypeError naming the argument when a value is not of the expected kind (``int``, ``float``
    or ``str``; a bool is not a number; an integer is a float): ``check_types(cycles=(v, int))``."""
    for name, (value, kind) in args.items():
        cls, what = _KINDS[kind]
        if not isinstance(value, cls) or isinstance(value, bool):
            raise TypeError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_range(name: str, value: float, lo: Optional[float] = None, hi: Optional[float] = None,
                lo_open: bool = False, hi_open: bool = False) -> None:
    """ValueError unless ``value`` is a number (not NaN) in the interval ``lo .. hi`` (closed
    unless ``lo_open``/``hi_open``; ``None``: unbounded)."""
    ok = isinstance(value, numbers.Real) and value == value
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {left}{'-inf' if lo is None else lo}, "
                         f"{'inf' if hi is None else hi}{right}, got {value!r}")


def check_int(name: str, value: Any, lo: int, hi: Optional[int] = None, *, hi_open: bool = False,
              hi_name: Optional[str] = None) -> None:
    """ValueError unless ``value`` is an int ``>= lo`` (and ``<= hi``, or ``< hi`` with
    ``hi_open``); ``hi_name`` says where ``hi`` comes from (``"population=50"``)."""
    ok = isinstance(value, int) and value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        if hi is None:
            what = f">= {lo}"
        else:
            what = f"in [{lo}, {hi_name or hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be an int {what}, got {value!r}")


def check_at_least(name: str, value: float, lo: float, unit: str = "") -> None:
    """ValueError unless ``value >= lo`` (for values whose type is already checked)."""
    if not value >= lo:
        raise ValueError(f"{name} must be >= {lo}{unit}, got {value}")


def check_finite_nonneg(name: str, value: float) -> None:
    """ValueError unless ``value`` is a finite number ``>= 0``."""
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def check_model(model: Any) -> None:
    """TypeError unless ``model`` is an ``nn.Module`` holding parameters."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if next(model.parameters(), None) is None:
        raise TypeError(f"the model ({type(model).__name__}) has no parameters to train")


def check_generator(generator: Any) -> None:
    """``None`` or a CPU ``torch.Generator`` (every method draws its random streams on the CPU)."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError("generator must be a CPU torch.Generator (the streams are drawn on "
                         f"the CPU), got one on {generator.device}")


def check_pool_and_batch(pool_size: Optional[int], batch_size: Optional[int]) -> None:
    """The optimizers' minibatch arguments: both (the closure gets minibatch indices) or neither
    (the closure takes no argument); ``1 <= batch_size <= pool_size``."""
    if (pool_size is None) != (batch_size is None):
        raise ValueError("pool_size and batch_size go together: give both (the closure gets "
                         "minibatch indices) or neither (the closure takes no argument)")
    if pool_size is not None:
        check_int("pool_size", pool_size, 1)
        check_int("batch_size", batch_size, 1, pool_size, hi_name=f"pool_size={pool_size}")
