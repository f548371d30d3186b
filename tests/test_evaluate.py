"""The pure-PyTorch candidate evaluators compute the same losses: FullForward (whole forward per
candidate), CachedInput (suffix from the cached input, the authors' way) and BatchedCandidates (the
K candidates stacked into one K·B forward, BatchNorm statistics per candidate)."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from rso_ext import RSO, models
from rso_ext.batchnorm import calibrate, search_mode
from rso_ext.data import load_splits
from rso_ext.evaluate import BatchedCandidates, CachedInput, FullForward
from rso_ext.sweep import TorchSweeper
from rso_ext.visit import execution_order, visit_units

from helpers import TinyDag, tiny_net, toy_data

EVALUATORS = (FullForward, CachedInput, BatchedCandidates)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mnist():
    """300 images of the embedded MNIST subset, normalised as for training."""
    s = load_splits()
    return s.train_x[:300].contiguous(), s.train_y[:300].contiguous()


def _all_losses(net, x, y, weights_of, calib=100, B=32, evaluators=EVALUATORS):
    """{unit name: [losses of each evaluator]} for the weights ``weights_of(n)`` of every unit,
    under the search modes of the driver (calibrated upstream BatchNorms, batch statistics from
    the swept module on)."""
    units = visit_units(net, x[:2])
    order = [m for _, m in execution_order(net, x[:2])]
    calibrate(net, x[:calib])
    g = torch.Generator().manual_seed(3)
    out = {}
    for unit in units:
        flat = unit.param.data.view(-1)
        ks = weights_of(flat.numel())
        idx = torch.randperm(len(x), generator=g)[:B]
        steps = torch.randn(len(ks), generator=g).abs() * 0.5 + 0.05
        per_eval = []
        for E in evaluators:
            ev = E(net)
            before = flat.clone()
            with search_mode(net, order, unit.position):
                ev.begin(unit, x)
                rows = []
                for k, d in zip(ks, steps):
                    w = flat[k] * (1 - 1e-4)
                    vals = torch.stack([w, w + d, w - d])
                    rows.append(ev.losses(k, vals, idx, y[idx]))
                    ev.set(k, before[k])
                ev.end()
            assert torch.equal(flat, before)
            per_eval.append(torch.stack(rows))
        out[unit.name] = per_eval
    return out


def _check(out, rtol=1e-5):
    for name, (full, cached, batched) in out.items():
        assert full.dtype == torch.float64 and full.shape[1] == 3
        torch.testing.assert_close(cached, full, rtol=rtol, atol=1e-9, msg=f"cached vs full, {name}")
        torch.testing.assert_close(batched, cached, rtol=rtol, atol=1e-9,
                                   msg=f"batched vs cached, {name}")


def test_paper_mnist_every_unit_same_losses(mnist):
    x, y = mnist
    net = models.paper_mnist(torch.Generator().manual_seed(0))
    out = _all_losses(net, x, y, lambda n: sorted({0, n // 3, n - 1}))
    assert len(out) == 19
    _check(out)


def test_pytorch_example_every_unit_same_losses(mnist):
    x, y = mnist
    net = models.pytorch_example(torch.Generator().manual_seed(1))
    out = _all_losses(net, x[:160], y[:160], lambda n: sorted({0, min(n // 2 + 7, n - 1), n - 1}), calib=64)
    assert set(out) == {"fc2.weight", "fc2.bias", "fc1.weight", "fc1.bias", "conv2.weight",
                        "conv2.bias", "conv1.weight", "conv1.bias"}
    _check(out)


@pytest.mark.parametrize("seed", [0, 1])
def test_tiny_net_with_biases_every_weight(seed):
    x, y = toy_data(80, seed=seed)
    net = tiny_net(seed=seed, bias=True)
    _check(_all_losses(net, x, y, lambda n: range(n), calib=40, B=20))


def test_batch_norm_1d_and_running_statistics_in_the_suffix():
    """BatchNorm1d after a linear layer; suffix BatchNorms on batch statistics (search mode) and
    on running statistics (eval mode) both give the full-forward losses."""
    g = torch.Generator().manual_seed(5)
    net = nn.Sequential(OrderedDict([
        ("fc1", nn.Linear(12, 8)), ("bn1", nn.BatchNorm1d(8)), ("relu", nn.ReLU()),
        ("drop", nn.Dropout(0.5)), ("fc2", nn.Linear(8, 6, bias=False)),
        ("bn2", nn.BatchNorm1d(6)), ("fc3", nn.Linear(6, 4)),
    ]))
    models.he_init_(net, g)
    x, y = torch.randn(50, 12, generator=g), torch.randint(0, 4, (50,), generator=g)
    _check(_all_losses(net, x, y, lambda n: range(0, n, 3), calib=50, B=16))
    # eval mode everywhere: every BatchNorm applies running statistics
    calibrate(net, x)
    idx = torch.arange(7, 23)
    for unit in visit_units(net, x[:2]):
        vals = unit.param.data.view(-1)[1] + torch.tensor([0.0, 0.4, -0.4])
        res = []
        for E in (FullForward, BatchedCandidates):
            ev = E(net)
            ev.begin(unit, x)
            res.append(ev.losses(1, vals, idx, y[idx]))
            ev.set(1, vals[0])
        torch.testing.assert_close(res[1], res[0], rtol=1e-5, atol=1e-9)


def test_sweeps_make_the_same_decisions():
    """Whole seeded sweeps of every unit: BatchedCandidates and CachedInput leave the same weights."""
    x, y = toy_data(90, seed=2)
    finals = []
    for E in (CachedInput, BatchedCandidates):
        net = tiny_net(seed=2)
        rso = RSO(net, batch_size=15, generator=torch.Generator().manual_seed(9))
        rso.calibrate(x)
        for i, unit in enumerate(rso.units):
            rso.sweep_unit(i, x, y, sweeper=TorchSweeper(unit, E(net)))
        finals.append({k: v.clone() for k, v in net.state_dict().items()})
    for k in finals[0]:
        torch.testing.assert_close(finals[1][k], finals[0][k], rtol=0, atol=0, msg=k)


def test_supports_sequential_with_direct_children_only():
    x, _ = toy_data(4)
    dag = TinyDag()
    assert not BatchedCandidates.supports(dag, visit_units(dag, x[:2])[0])
    inner = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3))
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), inner,
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2, bias=False))
    units = visit_units(net, x[:2])
    conv = next(u for u in units if u.module is net[0])
    fc = next(u for u in units if u.module is net[4])
    assert not BatchedCandidates.supports(net, conv)   # a later BatchNorm nested in a child
    assert BatchedCandidates.supports(net, fc)
    with pytest.raises(TypeError, match="cannot sweep '0.weight'"):
        BatchedCandidates(net).begin(conv, x)
