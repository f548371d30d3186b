"""Python entry points of the compiled operators in ``rso_ext._C``.

The kernels are registered with the PyTorch dispatcher as ``torch.ops.rso_ext.*``
(schemas in ``csrc/ops.cpp``, device-free code in ``csrc/core``, CPU kernels in
``csrc/cpu``, CUDA kernels in ``csrc/cuda``); the functions here are thin, documented
wrappers around them, plus pure-PyTorch references used by the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from rso_ext import _C
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "rso_ext._C (the compiled extension) could not be imported: "
        f"{exc}. Build it from the repository root with:\n"
        "    pip install torch==2.13.0 numpy pybind11 ninja && pip install --no-build-isolation -e .\n"
        "(the extension must be rebuilt whenever torch is upgraded)."
    ) from exc

__all__ = [
    "candidate_cross_entropy",
    "candidate_cross_entropy_reference",
    "cuda_built",
]


def cuda_built() -> bool:
    """Whether the CUDA kernels were compiled into this build of ``rso_ext._C``.

    ``False`` means CUDA tensors cannot be passed to the operators even if a GPU is
    present; rebuild with a CUDA build of torch and a CUDA toolkit (``RSO_EXT_CUDA=1``
    makes the build fail instead of silently leaving CUDA out).
    """
    return bool(_C.cuda_built())


def candidate_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Summed softmax cross-entropy of ``K`` candidate logit sets over one batch.

    Args:
        logits: ``[K, B, C]`` float32 or float64 tensor: the logits of ``K``
            candidates (e.g. perturbed weights) for the same ``B`` samples over ``C``
            classes (``K >= 1``, ``B >= 1``, ``C >= 2``).
        target: ``[B]`` int64 tensor of class indices in ``[0, C)``, on the same
            device as ``logits``.

    Returns:
        A float64 tensor ``[K]`` with
        ``out[k] = sum_b (logsumexp(logits[k, b]) - logits[k, b, target[b]])``,
        i.e. ``F.cross_entropy(logits[k], target, reduction="sum")``, computed with
        every logit upcast to float64 and float64 accumulation. The result is
        bitwise reproducible for a given device (independent of the number of CPU
        threads). Non-finite logits are not masked: the affected ``out[k]`` becomes
        NaN or inf.

    Raises:
        RuntimeError: for a wrong shape, dtype or device of either argument, or a
            target value outside ``[0, C)`` (the message names the argument, the
            offending position and value).
    """
    return torch.ops.rso_ext.candidate_cross_entropy(logits, target)


def candidate_cross_entropy_reference(logits: Tensor, target: Tensor) -> Tensor:
    """Pure-PyTorch reference of :func:`candidate_cross_entropy` (float64, ``[K]``)."""
    logits64 = logits.to(torch.float64)
    return torch.stack([F.cross_entropy(logits64[k], target, reduction="sum") for k in range(logits64.shape[0])])
