"""Numerical precision of the search on CUDA: exact float32 (the default) or TF32.

On Ampere and later GPUs cuDNN runs float32 convolutions on TF32 tensor cores by default
(``torch.backends.cudnn.allow_tf32``), about 1e-3 relative error per convolution: enough to move
RSO's decisions away from the CPU's and the reference's wherever two candidates are closer than
that. ``"exact"`` turns TF32 off for cuDNN and cuBLAS while a search runs; ``"tf32"`` turns it on
(faster dense suffixes on a GPU; its decisions can only be compared by loss margin). Neither
changes anything on the CPU. There is no bf16 mode: the fused evaluation computes in float32 or
float64 only.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, TypeVar

import torch

from .checks import check_choice

PRECISIONS = ("exact", "tf32")

T = TypeVar("T")


@contextlib.contextmanager
def precision(mode: str = "exact") -> Iterator[None]:
    """Within the block, cuDNN and cuBLAS float32 work is exact (``"exact"``) or may use TF32
    (``"tf32"``); the previous settings come back after it."""
    check_choice("precision", mode, PRECISIONS)
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    on = mode == "tf32"
    torch.backends.cudnn.allow_tf32 = on
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def during(items: Iterable[T], mode: str) -> Iterator[T]:
    """``items`` (e.g. a method's ``run`` generator) with each step computed under
    :func:`precision` ``mode``; the code between the steps keeps its own settings."""
    check_choice("precision", mode, PRECISIONS)
    it = iter(items)
    while True:
        with precision(mode):
            try:
                item = next(it)
            except StopIteration:
                return
        yield item
