"""Same seed, same weights (backend="torch" on the CPU): with 1 or 2 CPU threads, and across a
resume from a state dict into a freshly built model and generator."""
from __future__ import annotations

import pytest
import torch

from rso_ext import RSO

from helpers import TinyDag, tiny_net, toy_data


@pytest.fixture
def threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _sweeps(build, threads: int):
    """The first weights of every unit, on minibatches big enough (1000 samples) that torch's
    intra-op parallelism splits the work between threads."""
    torch.set_num_threads(threads)
    x, y = toy_data(2000)
    net = build()
    rso = RSO(net, cycles=2, batch_size=1000, calib_size=500, backend="torch",
              generator=torch.Generator().manual_seed(5))
    losses = [rso.sweep_unit(i, x, y, weights=2).mean_loss for i in range(7)]
    return {k: v.clone() for k, v in net.state_dict().items()}, losses


@pytest.mark.parametrize("build", [tiny_net, TinyDag], ids=["sequential", "dag"])
def test_same_seed_same_weights_with_1_or_2_threads(build, threads):
    a, la = _sweeps(build, 1)
    b, lb = _sweeps(build, 2)
    assert la == lb                                     # bitwise, not approximately
    assert all(torch.equal(a[k], b[k]) for k in a)


def _train(build, stop_after: int | None = None):
    x, y = toy_data(160)
    net = build()
    kw = dict(cycles=2, batch_size=40, calib_size=100, backend="torch")
    rso = RSO(net, generator=torch.Generator().manual_seed(5), **kw)
    losses = []
    for i, s in enumerate(rso.run(x, y)):
        losses.append(s.mean_loss)
        if stop_after is not None and i + 1 == stop_after:
            state = rso.state_dict()
            net = build()                               # as a fresh process would
            rso = RSO(net, generator=torch.Generator().manual_seed(99), **kw)
            rso.load_state_dict(state)
            losses += [s.mean_loss for s in rso.run(x, y)]
            break
    return {k: v.clone() for k, v in net.state_dict().items()}, losses


@pytest.mark.parametrize("build", [tiny_net, TinyDag], ids=["sequential", "dag"])
def test_same_seed_same_weights_across_a_resume(build, threads):
    torch.set_num_threads(1)
    a, la = _train(build)
    b, lb = _train(build, stop_after=9)                 # inside the second cycle
    assert la == lb and len(la) == 14
    assert all(torch.equal(a[k], b[k]) for k in a)
