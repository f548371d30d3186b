"""Fixtures shared by the test modules."""
import pytest
import torch

# Exact float32 on a GPU: cuDNN convolutions (and matmuls, if enabled) would otherwise use TF32
# tensor cores on Ampere and later, about 1e-3 relative error, and every CPU-vs-CUDA parity
# test at rtol 2e-6 would fail for that reason alone (issue 15's precision policy).
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny nets: they gain nothing from two, and on a loaded
    2-core machine two OpenMP threads can make them many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["cpu-passes", "device-generic"])
def code_paths(request):
    """Run a test twice: with the hand-written CPU passes, and with the device-generic code the
    CUDA backend runs (rso_ext.ops.device_generic_paths), so that the CPU covers both."""
    from rso_ext import ops
    with ops.device_generic_paths(request.param == "device-generic"):
        yield request.param
