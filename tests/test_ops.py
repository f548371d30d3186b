"""Tests of the compiled operators in rso_ext._C (through rso_ext.ops)."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.testing._internal.optests.generate_tests import ALL_TEST_UTILS

from rso_ext import _C, ops
from rso_ext.batchnorm import calibrate, search_mode
from rso_ext.fused import FusedSweeper, lower
from rso_ext.visit import execution_order, visit_units

from helpers import TinyDag, tiny_net, toy_data

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


# --- the built extension ----------------------------------------------------------


@pytest.mark.build
def test_an_error_that_formats_numbers_does_not_crash_the_process():
    # A libstdc++ linked statically into _C, beside libtorch's shared one, breaks the streams
    # that format error messages: the process segfaulted (GCC 13 on the H200 machine) or the
    # numbers were left out of the message (GCC 12 here). Run it in a child so that such a build
    # fails this test with a message instead of ending the session.
    child = textwrap.dedent("""
        import torch
        from rso_ext import ops
        target = torch.zeros(600, dtype=torch.long)
        target[417] = 5
        try:
            ops.candidate_cross_entropy(torch.zeros(2, 600, 3), target)
        except RuntimeError as e:
            print(e)
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, (
        f"formatting an error message crashed the process (exit status {proc.returncode}); is "
        f"libstdc++ linked into rso_ext._C statically? (setup.py)\n{proc.stderr[-2000:]}")
    assert "with C = 3, got target[417] = 5" in proc.stdout


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


# --- the op library: kinds, schemas, fake kernels ------------------------------------


def test_op_kinds_are_the_cpp_enum():
    # rso_ext._C.op_kinds(): the enumerators of rso::OpKind (csrc/core/program.h)
    assert _C.op_kinds() == ops.OP_KINDS
    assert [ops.CONV, ops.LINEAR, ops.BN, ops.RELU, ops.AVGPOOL, ops.MAXPOOL, ops.GAP,
            ops.FLATTEN, ops.SAVE, ops.LOAD, ops.INPUT, ops.ADD] == list(range(12))


def test_opcheck_candidate_cross_entropy():
    for dtype in (torch.float32, torch.float64):
        logits, target = _inputs(3, 7, 4, dtype=dtype)
        torch.library.opcheck(torch.ops.rso_ext.candidate_cross_entropy.default, (logits, target))


def _chain():
    """A small Sequential with every chain op, lowered; its program_forward program."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.BatchNorm2d(3),
                              torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Conv2d(3, 2, 3),
                              torch.nn.AvgPool2d(2, 1), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(2, 3))
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    calibrate(net, x)
    plan = lower(net.eval(), x[:2])
    return net, x, plan.forward_program(0, len(plan.steps))


def test_opcheck_program_forward():
    # registered CompositeExplicitAutograd in C++ and no fake kernel: under FakeTensorMode the
    # composite kernel runs on meta tensors (where it takes ATen ops only, no CPU passes).
    # test_aot_dispatch_dynamic is left out: with symbolic shapes the C++ kernel, which reads
    # concrete sizes, cannot run.
    _, x, prog = _chain()
    assert set(prog.kinds) == {ops.CONV, ops.BN, ops.RELU, ops.MAXPOOL, ops.AVGPOOL, ops.GAP,
                               ops.FLATTEN, ops.LINEAR}
    torch.library.opcheck(torch.ops.rso_ext.program_forward.default,
                          (x, list(prog.kinds), list(prog.params), list(prog.eps),
                           list(prog.tensors)),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


def test_program_forward_traces_under_fake_tensors_as_it_is():
    net, x, prog = _chain()
    with torch.no_grad():
        want = net(x)
    torch.testing.assert_close(ops.program_forward(x, prog), want, rtol=1e-5, atol=1e-5)
    with FakeTensorMode() as mode:
        fake = ops.Program(prog.kinds, prog.params, prog.eps,
                           [None if t is None else mode.from_tensor(t) for t in prog.tensors])
        out = ops.program_forward(mode.from_tensor(x), fake)
    assert out.shape == want.shape and out.dtype == want.dtype and out.device == want.device


def _sweep_cases():
    """(name, build) of small fused sweeps: every unit kind, a chain and a dag program."""
    cases = []
    for unit_name in ("conv2.weight", "conv2.bias", "bn1.weight", "bn2.bias", "fc.weight"):
        cases.append((unit_name, lambda n=unit_name: (tiny_net(seed=1, bias=True), n)))
    cases.append(("dag", lambda: (TinyDag(), None)))
    return cases


def _begun(build):
    net, unit_name = build()
    x, y = toy_data(30)
    calibrate(net, x)
    units = visit_units(net, x[:2])
    unit = units[0] if unit_name is None else next(u for u in units if u.name == unit_name)
    order = [m for _, m in execution_order(net, x[:2])]
    sw = FusedSweeper(lower(net, x[:2]), unit)
    with search_mode(net, order, unit.position):
        sw.begin(x, y)
    return sw


def _opcheck_in_place(op, args, test_utils=("test_schema", "test_faketensor")):
    """torch.library.opcheck's own test utilities, on ``args`` as given. opcheck itself first
    clones every tensor on its own, which parts the swept parameter from the program's tensor
    of the unit; the fused ops require the two to share storage and refuse the clones (as
    they should). Schema check: only the ``Tensor(a!)`` arguments (z, param) may change;
    fake check: the fake kernel's outputs match the real ones in shape, dtype, strides."""
    for name in test_utils:
        ALL_TEST_UTILS[name](op, args, {}, copy_inputs=False)


@pytest.mark.parametrize("name,build", _sweep_cases(), ids=[c[0] for c in _sweep_cases()])
def test_opcheck_fused_ops(name, build):
    sw = _begun(build)
    p, param = sw.prog.program, sw.unit.param.data
    unit = (sw.prog.unit_kind, sw.prog.unit_op)
    prog = (list(p.kinds), list(p.params), list(p.eps), list(p.tensors))
    w = param.view(-1)[:2].clone()
    values = torch.stack([w, w + 0.3, w - 0.3], dim=1)
    batches = torch.arange(20).view(2, 10)

    _opcheck_in_place(torch.ops.rso_ext.fused_candidate_losses.default,
                      (sw.x, sw.z, param, sw.y, *prog, *unit, 1, values[1], batches[1]))
    _opcheck_in_place(torch.ops.rso_ext.fused_sweep.default,
                      (sw.x, sw.z, param, sw.y, *prog, *unit, 0, values, batches))
    before = param.clone()
    _opcheck_in_place(torch.ops.rso_ext.fused_set_weight.default,
                      (sw.x, sw.z, param, *prog, *unit, 1, float(w[1]) + 0.5))
    assert not torch.equal(param, before)      # the schema check saw a real write

    # the typed wrappers call the same ops
    losses = ops.fused_candidate_losses(sw.x, sw.z, param, sw.y, p, unit_kind=unit[0],
                                        unit_op=unit[1], k=0, values=values[0], batch=batches[0])
    assert losses.shape == (3,) and losses.dtype == torch.float64
    chosen, all_losses = ops.fused_sweep(sw.x, sw.z, param, sw.y, p, unit_kind=unit[0],
                                         unit_op=unit[1], k0=0, values=values, batches=batches)
    assert chosen.shape == (2,) and chosen.dtype == torch.int64
    assert all_losses.shape == (2, 3) and all_losses.dtype == torch.float64
    assert ops.fused_set_weight(sw.x, sw.z, param, p, unit_kind=unit[0], unit_op=unit[1], k=0,
                                value=0.25) is None
    assert float(param.view(-1)[0]) == 0.25


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
