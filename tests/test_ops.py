"""Tests of the compiled operators in rso_ext._C (through rso_ext.ops)."""

import math

import pytest
import torch

from rso_ext import _C, ops

SHAPES = [(1, 1, 2), (3, 7, 2), (4, 33, 10), (2, 257, 100), (5, 1000, 3), (2, 3, 1000)]

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(K, B, C, dtype=torch.float64, scale=1.0, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(K, B, C, generator=g, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, C, (B,), generator=g)
    return logits.to(device), target.to(device)


def _assert_close(actual, expected, rtol=1e-12):
    assert actual.dtype == torch.float64
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-12)


# --- values ------------------------------------------------------------------------


@pytest.mark.parametrize("K,B,C", SHAPES)
def test_matches_reference_float64(K, B, C):
    logits, target = _inputs(K, B, C)
    _assert_close(ops.candidate_cross_entropy(logits, target), ops.candidate_cross_entropy_reference(logits, target))


@pytest.mark.parametrize("K,B,C", SHAPES)
def test_matches_reference_float32(K, B, C):
    logits, target = _inputs(K, B, C, dtype=torch.float32)
    out = ops.candidate_cross_entropy(logits, target)
    # The op upcasts every float32 logit to float64; so does the reference.
    _assert_close(out, ops.candidate_cross_entropy_reference(logits.double(), target))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C", [2, 10])
def test_large_logits_are_stable(dtype, C):
    logits, target = _inputs(4, 64, C, dtype=dtype, scale=1e4)
    logits[0, 0] = torch.tensor([1e4, -1e4] + [0.0] * (C - 2), dtype=dtype)
    logits[1, :, :] = -1e4
    logits[2, 0, target[0]] = 1e4
    out = ops.candidate_cross_entropy(logits, target)
    assert torch.isfinite(out).all()
    _assert_close(out, ops.candidate_cross_entropy_reference(logits.double(), target))
    # All logits equal: each sample costs exactly log(C).
    assert out[1].item() == pytest.approx(64 * math.log(C), rel=1e-14)


def test_single_sample_closed_form():
    logits = torch.tensor([[[0.0, 0.0]], [[3.0, 1.0]]], dtype=torch.float64)
    target = torch.tensor([1])
    out = ops.candidate_cross_entropy(logits, target)
    assert out[0].item() == pytest.approx(math.log(2.0), rel=1e-15)
    assert out[1].item() == pytest.approx(2.0 + math.log1p(math.exp(-2.0)), rel=1e-15)


def test_non_contiguous_inputs():
    logits, target = _inputs(3, 20, 5)
    logits_t = logits.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    target_t = torch.stack([target, target], 1)[:, 0]
    assert not logits_t.is_contiguous() and not target_t.is_contiguous()
    assert torch.equal(ops.candidate_cross_entropy(logits_t, target_t), ops.candidate_cross_entropy(logits, target))


def test_matches_dispatcher_op():
    logits, target = _inputs(2, 9, 4)
    assert torch.equal(
        ops.candidate_cross_entropy(logits, target), torch.ops.rso_ext.candidate_cross_entropy(logits, target)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_deterministic_across_thread_counts(dtype):
    logits, target = _inputs(8, 5000, 10, dtype=dtype, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.candidate_cross_entropy(logits, target)
        torch.set_num_threads(2)
        two = ops.candidate_cross_entropy(logits, target)
        again = ops.candidate_cross_entropy(logits, target)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert torch.equal(two, again)


def test_non_finite_logits_only_affect_their_candidate():
    logits, target = _inputs(5, 6, 4)
    logits[1, 2, 0] = float("nan")
    logits[2, 3, target[3]] = float("inf")  # +inf target logit
    logits[3, 4, (target[4] + 1) % 4] = float("inf")  # +inf non-target logit
    logits[4, 5, (target[5] + 1) % 4] = float("-inf")  # harmless: exp(-inf) = 0
    out = ops.candidate_cross_entropy(logits, target)
    ref = ops.candidate_cross_entropy_reference(logits, target)
    assert math.isnan(out[1].item())
    assert not math.isfinite(out[2].item())
    assert out[3].item() == math.inf
    for k in (0, 4):
        assert math.isfinite(out[k].item())
        assert out[k].item() == pytest.approx(ref[k].item(), rel=1e-12)


# --- argument checks -----------------------------------------------------------------


@pytest.mark.parametrize(
    "logits,target,match",
    [
        (torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), r"logits must be a 3-D tensor \[K, B, C\]"),
        (torch.zeros(1, 2, 3, 4), torch.zeros(2, dtype=torch.long), r"logits must be a 3-D tensor"),
        (torch.zeros(0, 4, 3), torch.zeros(4, dtype=torch.long), r"K >= 1"),
        (torch.zeros(2, 0, 3), torch.zeros(0, dtype=torch.long), r"B >= 1"),
        (torch.zeros(2, 4, 1), torch.zeros(4, dtype=torch.long), r"C >= 2"),
        (torch.zeros(2, 4, 3, dtype=torch.float16), torch.zeros(4, dtype=torch.long), r"logits must be float32 or float64"),
        (torch.zeros(2, 4, 3, dtype=torch.int64), torch.zeros(4, dtype=torch.long), r"logits must be float32 or float64"),
        (torch.zeros(2, 4, 3), torch.zeros(4, dtype=torch.int32), r"target must be int64"),
        (torch.zeros(2, 4, 3), torch.zeros(4, dtype=torch.float32), r"target must be int64"),
        (torch.zeros(2, 4, 3), torch.zeros(5, dtype=torch.long), r"target must be a 1-D tensor of length B = 4"),
        (torch.zeros(2, 4, 3), torch.zeros(4, 1, dtype=torch.long), r"target must be a 1-D tensor of length B = 4"),
        (torch.zeros(2, 4, 3), torch.tensor([0, 1, 3, 2]), r"\[0, C\) with C = 3, got target\[2\] = 3"),
        (torch.zeros(2, 4, 3), torch.tensor([0, 1, 2, -1]), r"\[0, C\) with C = 3, got target\[3\] = -1"),
        (torch.zeros(2, 4, 3), torch.tensor([0, 7, -2, 2]), r"got target\[1\] = 7"),
    ],
)
def test_bad_arguments_raise(logits, target, match):
    with pytest.raises(RuntimeError, match=match):
        ops.candidate_cross_entropy(logits, target)


def test_cuda_built_is_bool():
    assert isinstance(ops.cuda_built(), bool)


# --- the op library: kinds ----------------------------------------------------------


def test_op_kinds_are_the_cpp_enum():
    # rso_ext._C.op_kinds(): the enumerators of rso::OpKind (csrc/core/program.h)
    assert _C.op_kinds() == ops.OP_KINDS
    assert [ops.CONV, ops.LINEAR, ops.BN, ops.RELU, ops.AVGPOOL, ops.MAXPOOL, ops.GAP,
            ops.FLATTEN, ops.SAVE, ops.LOAD, ops.INPUT, ops.ADD] == list(range(12))


# --- CUDA ----------------------------------------------------------------------------


@pytest.mark.cuda
@needs_gpu
def test_cuda_kernels_are_built():
    assert ops.cuda_built(), (
        "a GPU is visible but rso_ext._C was built without its CUDA kernels; rebuild with a CUDA "
        "build of torch and nvcc (RSO_EXT_CUDA=1 pip install --no-build-isolation -e .)"
    )


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("K,B,C", SHAPES + [(16, 4096, 10), (3, 100, 5000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_cuda_matches_cpu(K, B, C, dtype, scale):
    logits, target = _inputs(K, B, C, dtype=dtype, scale=scale)
    cpu = ops.candidate_cross_entropy(logits, target)
    gpu = ops.candidate_cross_entropy(logits.cuda(), target.cuda())
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float64
    _assert_close(gpu.cpu(), cpu)


@pytest.mark.cuda
@needs_gpu
def test_cuda_is_deterministic_and_handles_non_contiguous():
    logits, target = _inputs(8, 20000, 10, dtype=torch.float32, seed=5, device="cuda")
    first = ops.candidate_cross_entropy(logits, target)
    for _ in range(3):
        assert torch.equal(ops.candidate_cross_entropy(logits, target), first)
    logits_t = logits.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(ops.candidate_cross_entropy(logits_t, target), first)


@pytest.mark.cuda
@needs_gpu
def test_cuda_non_finite_logits_only_affect_their_candidate():
    logits, target = _inputs(3, 300, 4)
    logits[1, 123, 2] = float("nan")
    out = ops.candidate_cross_entropy(logits.cuda(), target.cuda()).cpu()
    assert math.isnan(out[1].item())
    _assert_close(out[[0, 2]], ops.candidate_cross_entropy(logits, target)[[0, 2]])


@pytest.mark.cuda
@needs_gpu
def test_cuda_bad_arguments_raise():
    logits = torch.zeros(2, 600, 3, device="cuda")
    target = torch.zeros(600, dtype=torch.long, device="cuda")
    target[[417, 550]] = torch.tensor([5, -1], device="cuda")
    with pytest.raises(RuntimeError, match=r"\[0, C\) with C = 3, got target\[417\] = 5"):
        ops.candidate_cross_entropy(logits, target)
    with pytest.raises(RuntimeError, match=r"must be on the same device"):
        ops.candidate_cross_entropy(logits, target.cpu())
    with pytest.raises(RuntimeError, match=r"must be on the same device"):
        ops.candidate_cross_entropy(logits.cpu(), target.clamp(0, 2))
    with pytest.raises(RuntimeError, match=r"logits must be float32 or float64"):
        ops.candidate_cross_entropy(logits.half(), target.clamp(0, 2))
    # The stream is still usable after a reported error.
    ok = ops.candidate_cross_entropy(logits, target.clamp(0, 2))
    assert torch.isfinite(ok).all()
