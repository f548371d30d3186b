"""Fixtures shared by the test modules."""
import pytest
import torch


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
