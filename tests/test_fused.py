"""The fused candidate evaluation (backend="fused") against the pure-PyTorch reference."""
from __future__ import annotations

import dataclasses
from collections import OrderedDict

import pytest
import torch
from torch import nn

from rso_ext import RSO, models, ops
from rso_ext.batchnorm import calibrate, search_mode
from rso_ext.evaluate import FullForward
from rso_ext.fused import CacheStore as FusedStore, FusedSweeper, PlanError, lower
from rso_ext.streams import SweepStreams
from rso_ext.sweep import NonFiniteLossError, candidate_values
from rso_ext.visit import execution_order, visit_units

from helpers import CatDag, TinyDag, fused_sweep, tiny_net, toy_data

RTOL = 2e-6   # summed float64 losses of float32 nets: fused vs reference, relative

# every test of this module runs through the hand-written CPU passes and through the
# device-generic code of the CUDA backend (conftest.py, code_paths)
pytestmark = pytest.mark.usefixtures("code_paths")


def _compare_unit(net, x, y, unit, order, plan, ks, B=24, scale=0.3):
    """Fused and full-forward losses of weights ``ks`` of ``unit`` on one minibatch."""
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(len(ks)))[:B]
    with search_mode(net, order, unit.position):
        ref, fused = FullForward(net), FusedSweeper(plan, unit)
        ref.begin(unit, x)
        fused.begin(x, y)
        for k in ks:
            w = unit.param.data.view(-1)[k].clone()
            vals = w + torch.tensor([0.0, scale, -scale, 2 * scale])
            a = ref.losses(k, vals, idx, y[idx])
            unit.param.data.view(-1)[k] = w
            b = fused.losses(k, vals, idx)
            torch.testing.assert_close(b, a, rtol=RTOL, atol=1e-7,
                                       msg=lambda m: f"{unit.name}[{k}]: {m}")
        ref.end()
        fused.end()


def _check_all_units(net, x, y, per_unit=3):
    calibrate(net, x[: len(x) // 2])
    units = visit_units(net, x[:2])
    order = [m for _, m in execution_order(net, x[:2])]
    plan = lower(net, x[:2])
    for unit in units:
        n = unit.param.numel()
        ks = sorted({0, n - 1, *torch.randint(0, n, (per_unit,)).tolist()})
        _compare_unit(net, x, y, unit, order, plan, ks)


@pytest.mark.parametrize("name", ["paper_mnist", "pytorch_example"])
def test_every_layer_of_the_models_matches_the_reference(name):
    torch.manual_seed(0)
    net = models.get_model(name, torch.Generator().manual_seed(1))
    x = torch.rand(64, 1, 28, 28) - 0.13
    y = torch.randint(0, 10, (64,))
    _check_all_units(net, x, y, per_unit=2)


def _randomise(net: nn.Module, g: torch.Generator) -> nn.Module:
    """BatchNorm affine parameters and biases away from their initial 1/0, so that they count."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.3, 0.3, generator=g)
            elif getattr(m, "bias", None) is not None:
                m.bias.uniform_(-0.2, 0.2, generator=g)
    return net


def _random_net(seed: int) -> tuple[nn.Sequential, tuple[int, ...]]:
    """A random Sequential from the supported op set: conv (stride, padding, bias), BN, ReLU,
    max/avg pooling, GAP or flatten, linear layers with optional BN1d/ReLU."""
    g = torch.Generator().manual_seed(seed)
    r = lambda n: int(torch.randint(0, n, (1,), generator=g))  # noqa: E731
    layers: list[tuple[str, nn.Module]] = []
    c, hw = r(2) + 1, 12
    for i in range(r(2) + 1):
        cout, k = [2, 3, 4, 8][r(4)], [1, 3][r(2)]   # 8: the register-blocked CPU path
        stride, pad = [1, 1, 2][r(3)], r(2) if k == 3 else 0
        layers.append((f"conv{i}", nn.Conv2d(c, cout, k, stride, pad, bias=bool(r(2)))))
        hw = (hw + 2 * pad - k) // stride + 1
        if r(2):
            layers.append((f"bn{i}", nn.BatchNorm2d(cout)))
        if r(2) and hw >= 4:
            kind, (pk, ps, pp) = [nn.MaxPool2d, nn.AvgPool2d][r(2)], [(2, 2, 0), (3, 2, 1)][r(2)]
            layers.append((f"pool{i}", kind(pk, ps, pp)))
            hw = (hw + 2 * pp - pk) // ps + 1
        layers.append((f"relu{i}", nn.ReLU()))
        c = cout
    if r(2):
        layers += [("gap", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten())]
        feat = c
    else:
        layers.append(("flat", nn.Flatten()))
        feat = c * hw * hw
    if r(2):
        layers.append(("fc0", nn.Linear(feat, 6, bias=bool(r(2)))))
        if r(2):
            layers.append(("bnf", nn.BatchNorm1d(6)))
        layers += [("relu_f", nn.ReLU()), ("drop", nn.Dropout(0.5))]
        feat = 6
    layers.append(("out", nn.Linear(feat, 4, bias=bool(r(2)))))
    net = _randomise(models.he_init_(nn.Sequential(OrderedDict(layers)), g), g)
    return net, (c, hw)


@pytest.mark.parametrize("seed", range(12))
def test_random_nets_of_every_supported_op_match_the_reference(seed):
    net, _ = _random_net(seed)
    g = torch.Generator().manual_seed(100 + seed)
    cin = net[0].in_channels
    x = torch.randn(48, cin, 12, 12, generator=g)
    y = torch.randint(0, 4, (48,), generator=g)
    _check_all_units(net, x, y)


def _wide_net(seed: int) -> nn.Sequential:
    """Convolutions of 8 and more channels on 13 x 11 planes: the CPU runs them channels-last
    (cpu::conv2d_channels_last), their input written in that layout by a BatchNorm before them
    (with and without a ReLU) or transposed by the conv itself (after a ReLU alone); 12
    channels and 143 / 42 positions leave rows and columns past the 8 x 8 transpose tiles."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(2, 8, 3, padding=1)), ("bn1", nn.BatchNorm2d(8)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(8, 12, 3, padding=1, bias=False)), ("bn2", nn.BatchNorm2d(12)),
        ("conv3", nn.Conv2d(12, 9, 3, stride=2, padding=1)), ("relu3", nn.ReLU()),
        ("conv4", nn.Conv2d(9, 8, 1)), ("bn4", nn.BatchNorm2d(8)), ("relu4", nn.ReLU()),
        ("gap", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten()), ("out", nn.Linear(8, 4))]))
    return _randomise(models.he_init_(net, g), g)


def test_channels_last_convolutions_match_the_reference():
    net = _wide_net(seed=0)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 2, 13, 11, generator=g)
    y = torch.randint(0, 4, (40,), generator=g)
    _check_all_units(net, x, y, per_unit=3)
    _assert_program_forward_matches(net, x)


def _head_net(seed: int) -> nn.Sequential:
    """Every chain the CPU logits head takes: conv + bias -> BN -> GAP -> BN1d -> ReLU ->
    linear + bias -> BN1d -> ReLU -> dropout -> linear + bias (the logits)."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 3, 3, padding=1)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(3, 5, 3, stride=2, padding=1)), ("bn2", nn.BatchNorm2d(5)),
        ("gap", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten()), ("bn3", nn.BatchNorm1d(5)),
        ("relu3", nn.ReLU()), ("fc1", nn.Linear(5, 6)), ("bn4", nn.BatchNorm1d(6)),
        ("relu4", nn.ReLU()), ("drop", nn.Dropout(0.5)), ("fc2", nn.Linear(6, 4))]))
    return _randomise(models.he_init_(net, g), g)


def _pooled_strided_net(seed: int) -> nn.Sequential:
    """Average pools the fused evaluation folds into the conv before them (a 3x3 pool on an 8- or
    11-wide map, a 2x2 pool on a 3-wide one: floor mode drops a border; with and without bias)
    and next layers of stride 2, which the register-blocked CPU correction reads as phase
    planes; 8 channels, the blocked path's width."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 8, 3, padding=1)), ("bn1", nn.BatchNorm2d(8)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(8, 8, 3, padding=1, bias=False)), ("pool2", nn.AvgPool2d(3)),
        ("bn2", nn.BatchNorm2d(8)), ("relu2", nn.ReLU()),
        ("conv3", nn.Conv2d(8, 8, 3, stride=2, padding=1)), ("relu3", nn.ReLU()),
        ("conv4", nn.Conv2d(8, 8, 2, padding=1)), ("pool4", nn.AvgPool2d(2)),
        ("bn4", nn.BatchNorm2d(8)), ("flat", nn.Flatten()), ("fc", nn.Linear(8, 3))]))
    return _randomise(models.he_init_(net, g), g)


@pytest.mark.parametrize("size", [8, 11])
def test_pools_folded_into_convs_and_strided_next_layers_match_the_reference(size):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 1, size, size, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    _check_all_units(_pooled_strided_net(seed=size), x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_head_chains_match_the_reference(dtype):
    # float32: the vectorised exp/log of the head; float64: the library's, so the moments
    # algebra must agree with the reference to rounding
    net = _head_net(3).to(dtype)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 1, 8, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 4, (40,), generator=g)
    calibrate(net, x[:20])
    units = visit_units(net, x[:2])
    order = [m for _, m in execution_order(net, x[:2])]
    plan = lower(net, x[:2])
    tol = dict(rtol=RTOL, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    idx = torch.randperm(40, generator=g)[:24]
    for unit in units:
        if unit.module is net.conv1:
            continue   # its change passes conv2: not a head chain
        n = unit.param.numel()
        with search_mode(net, order, unit.position):
            ref, fused = FullForward(net), FusedSweeper(plan, unit)
            ref.begin(unit, x)
            fused.begin(x, y)
            for k in sorted({0, n // 2, n - 1}):
                w = unit.param.data.view(-1)[k].clone()
                vals = w + torch.tensor([0.0, 0.3, -0.3], dtype=dtype)
                a = ref.losses(k, vals, idx, y[idx])
                unit.param.data.view(-1)[k] = w
                b = fused.losses(k, vals, idx)
                torch.testing.assert_close(b, a, **tol, msg=lambda m: f"{unit.name}[{k}]: {m}")
            ref.end()
            fused.end()


def test_hand_written_cpu_passes_match_the_reference():
    """The CPU passes of csrc/cpu/program_passes.cpp on the shapes the random matrix misses:
    padded 3x3 max/avg pooling, the register-blocked single-channel correction (8 output
    channels, 3x3 and 5x5 taps, stride 1) and its fallback (stride 2)."""
    g = torch.Generator().manual_seed(7)
    net = models.he_init_(nn.Sequential(OrderedDict([
        ("conv0", nn.Conv2d(2, 3, 3, padding=1)), ("pool0", nn.MaxPool2d(3, 2, 1)),
        ("relu0", nn.ReLU()),
        ("conv1", nn.Conv2d(3, 8, 3, padding=1, bias=False)), ("bn1", nn.BatchNorm2d(8)),
        ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(8, 8, 5, padding=2)), ("pool2", nn.AvgPool2d(3, 2, 1)),
        ("relu2", nn.ReLU()),
        ("conv3", nn.Conv2d(8, 8, 3, stride=2, bias=False)), ("bn3", nn.BatchNorm2d(8)),
        ("gap", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten()), ("out", nn.Linear(8, 5))])), g)
    x = torch.randn(40, 2, 13, 13, generator=g)
    y = torch.randint(0, 5, (40,), generator=g)
    _check_all_units(net, x, y, per_unit=2)


@pytest.mark.parametrize("name", ["conv1.weight", "conv2.weight", "bn2.weight"])
def test_fixed_batchnorm_uses_running_statistics(name):
    # conv1: the generic evaluation; conv2 and bn2: the logits head (csrc/cpu/head_*.cpp)
    net = tiny_net(seed=2)
    x, y = toy_data(40)
    calibrate(net, x)
    units = visit_units(net, x[:2])
    order = [m for _, m in execution_order(net, x[:2])]
    unit = next(u for u in units if u.name == name)
    plan = lower(net, x[:2])
    idx = torch.arange(20)
    k = 1 if name.startswith("bn") else 4
    vals = unit.param.data.view(-1)[k] + torch.tensor([0.0, 0.2, -0.2])
    with search_mode(net, order, unit.position):
        net.bn2.eval()                                    # the reference: bn2 fixed
        net.bn2.track_running_stats = True
        ref = FullForward(net)
        ref.begin(unit, x)
        a = ref.losses(k, vals, idx, y[idx])
        unit.param.data.view(-1)[k] = vals[0]
        fused = FusedSweeper(plan, unit)
        fused.begin(x, y)
        steps = [s for s in plan.steps[plan.owner(unit):] if s.kind is not None]
        bn2 = next(i for i, s in enumerate(steps) if s.module is net.bn2)
        params = list(fused.prog.program.params)
        params[4 * bn2] = 0                               # running statistics
        fused.prog = dataclasses.replace(
            fused.prog, program=dataclasses.replace(fused.prog.program, params=params))
        b = fused.losses(k, vals, idx)
    torch.testing.assert_close(b, a, rtol=RTOL, atol=1e-7)


@pytest.mark.parametrize("batch", [16, 2, 80])
def test_z_cache_stays_exact_through_a_sweep(batch):
    # conv2 (3 input channels, 3x3) on a pool of 80: with B=16 every move updates z over the
    # pool; with B=2 recomputing the channel per minibatch is cheaper, so the sweep leaves
    # z[:, o] stale within a neuron and refreshes it when the neuron is done
    # (csrc/core/fused.cpp, lazy_z_pays). With B=80 (the pool) a neuron of fc (4 weights) sees
    # more samples than the pool holds: the CPU head moves a contiguous copy of z[:, o] and writes
    # it back when the neuron or the call ends (head_sweep.cpp, store_column); the sweep is
    # split in two calls inside a neuron. All must end exact.
    net = tiny_net(seed=5, bias=True)
    x, y = toy_data(80)
    calibrate(net, x)
    order = [m for _, m in execution_order(net, x[:2])]
    plan = lower(net, x[:2])
    for unit in visit_units(net, x[:2]):
        if unit.module is not net.conv2 and unit.module is not net.fc:
            continue
        streams = SweepStreams.draw(torch.Generator().manual_seed(3), unit.param.numel(), 0.5,
                                    len(x), batch)
        with search_mode(net, order, unit.position):
            sw = FusedSweeper(plan, unit)
            sw.begin(x, y)
            n = unit.param.numel()
            mid = 6 if n > 6 else n // 2    # fc.weight: inside its second neuron
            accepted = sw.run(0, mid, streams, 0.99)[0] + sw.run(mid, n, streams, 0.99)[0]
            # conv2's bias is cancelled by its batch-statistics BatchNorm: its candidates tie
            # exactly and the decay steps alone move it (and z)
            assert accepted > 0 or unit.module is net.conv2 and unit.param_name == "bias"
            torch.testing.assert_close(sw.z, unit.module(sw.x), rtol=1e-5, atol=1e-5)
            sw.end()


def test_set_many_writes_the_weights_and_rebuilds_z():
    # the mask search prunes up to a whole layer at the end of a sweep with one set_many: the
    # weights must be those written and Z_d that of a fresh build, for a conv and a linear unit
    net = tiny_net(seed=6, bias=True)
    x, y = toy_data(40)
    calibrate(net, x)
    order = [m for _, m in execution_order(net, x[:2])]
    plan = lower(net, x[:2])
    g = torch.Generator().manual_seed(2)
    seen = 0
    for unit in visit_units(net, x[:2]):
        if unit.param_name != "weight" or unit.module not in (net.conv2, net.fc):
            continue
        with search_mode(net, order, unit.position):
            sw = FusedSweeper(plan, unit)
            sw.begin(x, y)
            n = unit.param.numel()
            ks = torch.randperm(n, generator=g)[:n // 2]
            want = unit.param.detach().clone().view(-1)
            want[ks] = torch.randn(len(ks), generator=g)
            sw.set_many(ks, want[ks])
            assert torch.equal(unit.param.detach().view(-1), want)
            torch.testing.assert_close(sw.z, unit.module(sw.x), rtol=1e-5, atol=1e-5)
            sw.end()
            seen += 1
    assert seen == 2


def _paper_like(seed: int) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 4, 3, padding=1, bias=False)), ("pool1", nn.AvgPool2d(2)),
        ("bn1", nn.BatchNorm2d(4)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(4, 4, 3, padding=1, bias=False)), ("bn2", nn.BatchNorm2d(4)),
        ("gap", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten()),
        ("fc", nn.Linear(4, 3, bias=False))]))
    return models.he_init_(net, g)


@pytest.mark.parametrize("steps", [(1.0,), (1.0, 2.0)], ids=["K3", "K5"])
def test_seeded_sweeps_make_the_same_decisions_as_the_reference(monkeypatch, steps):
    x, y = toy_data(120, seed=4)
    runs = {}
    for backend in ("torch", "fused"):
        net = _paper_like(3)
        rso = RSO(net, cycles=2, batch_size=40, sampler="random", backend=backend,
                  generator=torch.Generator().manual_seed(9), candidate_steps=steps)
        stats = list(rso.run(x, y))
        runs[backend] = (net, [s.accepted for s in stats], [s.mean_loss for s in stats])
    (a, acc_a, loss_a), (b, acc_b, loss_b) = runs["torch"], runs["fused"]
    assert acc_a == acc_b and sum(acc_a) > 50
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(loss_b), torch.tensor(loss_a), rtol=1e-6, atol=0)


def test_pool_size_bounds_the_caches_and_keeps_backends_equal():
    x, y = toy_data(120, seed=4)
    weights = []
    for backend in ("torch", "fused"):
        net = _paper_like(5)
        rso = RSO(net, cycles=1, batch_size=20, pool_size=60, backend=backend,
                  generator=torch.Generator().manual_seed(2))
        list(rso.run(x, y))
        weights.append([p.detach().clone() for p in net.parameters()])
    for p, q in zip(*weights):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pool_size=10 must be at least batch_size=20"):
        RSO(_paper_like(0), batch_size=20, pool_size=10)


# -- the planner --------------------------------------------------------------------------------
def test_planner_names_what_it_cannot_lower():
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(PlanError, match=r"module '1' \(GELU\) is outside the fused op set"):
        lower(nn.Sequential(nn.Conv2d(1, 2, 3), nn.GELU(), nn.Flatten(), nn.Linear(72, 3)), x)
    with pytest.raises(PlanError, match=r"module '<root>' \(CatDag\): the function torch.cat"):
        lower(CatDag(), x)          # more traced forwards: tests/test_fused_graph.py
    with pytest.raises(PlanError, match="groups=2"):
        lower(nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(72, 3)),
              torch.zeros(2, 2, 8, 8))
    with pytest.raises(PlanError, match="ceil_mode"):
        lower(nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2, ceil_mode=True), nn.Flatten(),
                            nn.Linear(18, 3)), x)


def test_auto_falls_back_to_torch_and_fused_refuses():
    x, y = toy_data(30)
    rso = RSO(CatDag(), cycles=1, batch_size=10, backend="auto")
    rso.sweep_unit(0, x, y, weights=2)
    assert rso.backend == "torch"
    with pytest.raises(PlanError, match="CatDag"):
        RSO(CatDag(), cycles=1, batch_size=10, backend="fused").sweep_unit(0, x, y)
    rso = RSO(TinyDag(), cycles=1, batch_size=10, backend="auto")   # a residual add: lowered
    rso.sweep_unit(0, x, y, weights=2)
    assert rso.backend == "fused"
    rso = RSO(tiny_net(), cycles=1, batch_size=10, backend="auto")
    rso.sweep_unit(0, x, y, weights=2)
    assert rso.backend == "fused"


# -- the op boundary ----------------------------------------------------------------------------
@pytest.fixture
def sweeper():
    net = tiny_net(seed=1)
    x, y = toy_data(30)
    calibrate(net, x)
    unit = next(u for u in visit_units(net, x[:2]) if u.name == "conv2.weight")
    order = [m for _, m in execution_order(net, x[:2])]
    sw = FusedSweeper(lower(net, x[:2]), unit)
    with search_mode(net, order, unit.position):
        sw.begin(x, y)
        yield sw


def _call(sw, **over):
    args = dict(x=sw.x, z=sw.z, param=sw.unit.param.data, target=sw.y, program=sw.prog.program,
                unit_kind=sw.prog.unit_kind, unit_op=sw.prog.unit_op, k=0,
                values=torch.tensor([0.1, 0.2, 0.3]), batch=torch.arange(10))
    args.update(over)
    return ops.fused_candidate_losses(**args)


def test_op_boundary_errors_are_readable(sweeper, code_paths):
    sw = sweeper
    # the CPU head names the pool sample; the generic path's loss op the minibatch entry
    bad_label = (r"label 7 of pool sample 0 is outside \[0, 3\)" if code_paths == "cpu-passes"
                 else r"class indices in \[0, C\) with C = 3, got target\[0\] = 7")
    assert _call(sw).shape == (3,)
    cases = [
        (dict(x=sw.x.double()), "must share one dtype"),
        (dict(z=sw.z[:, :2].contiguous()), "z must be the layer's output"),
        (dict(batch=torch.tensor([0, 99])), "sample index 99 outside the pool"),
        (dict(batch=torch.arange(3).int()), "batch must be int64"),
        (dict(values=torch.tensor([0.1])), "K >= 2"),
        (dict(values=torch.tensor([0.1, 0.2], dtype=torch.float64)), "parameter's dtype"),
        (dict(k=10_000), "weight index k=10000"),
        (dict(param=sw.unit.param.data.clone()), "param must be the program's tensor"),
        (dict(unit_op=3), "a weight or bias unit belongs to op 0"),
        (dict(target=sw.y[:5]), "target must be an int64 vector of length N = 30"),
        (dict(target=torch.full_like(sw.y, 7)), bad_label),
        (dict(program=dataclasses.replace(sw.prog.program, params=(1, 1))),
         "op_params must hold 4 integers per op"),
    ]
    for over, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            _call(sw, **over)


def test_non_finite_candidates_are_never_chosen_and_a_non_finite_state_is_reported(sweeper):
    sw = sweeper
    w = float(sw.unit.param.data.view(-1)[0])
    values = torch.tensor([[w, float("nan"), float("inf")], [w, w + 5.0, float("nan")]])
    chosen, losses = fused_sweep(sw, values, torch.arange(20).view(2, 10))
    assert chosen[0] == 0 and chosen[1] in (0, 1)
    assert not torch.isfinite(losses[0, 1:]).any()
    sw.x[3] = float("nan")
    streams = SweepStreams.draw(torch.Generator().manual_seed(0), sw.unit.param.numel(), 0.1,
                                30, 30)
    with pytest.raises(NonFiniteLossError, match=r"layer 'conv2.weight', weight 0"):
        sw.run(0, 4, streams, 1.0)


def test_cache_store_hands_caches_to_the_next_unit_of_the_same_layer_only_while_exact():
    net = _paper_like(1)
    x, y = toy_data(60, seed=2)
    calibrate(net, x)
    order = [m for _, m in execution_order(net, x[:2])]
    plan = lower(net, x[:2])
    units = {u.name: u for u in visit_units(net, x[:2])}
    store = FusedStore()

    def begin(name):
        unit = units[name]
        sw = FusedSweeper(plan, unit, store=store)
        with search_mode(net, order, unit.position):
            sw.begin(x, y)
            want_x = net[:4](x)
            torch.testing.assert_close(sw.x, want_x, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(sw.z, net.conv2(want_x), rtol=1e-6, atol=1e-6)
        return sw

    sw = begin("conv2.weight")
    x0, z0 = sw.x, sw.z
    sw.end()
    # after a sweep of the layer's own weights Z_d is rebuilt, bitwise as a fresh build (what
    # a run resumed at the next unit computes), even where no move was accepted
    sw = begin("bn2.bias")
    assert sw.x is x0 and sw.z is not z0
    fresh = FusedSweeper(plan, units["bn2.bias"], store=None)
    with search_mode(net, order, units["bn2.bias"].position):
        fresh.begin(x, y)
    assert torch.equal(sw.z, fresh.z) and torch.equal(sw.x, fresh.x)
    x0, z0 = sw.x, sw.z
    sw.end()
    sw = begin("bn2.weight")                     # a BN unit moved nothing of conv2: both reused
    assert sw.x is x0 and sw.z is z0
    sw.end()
    with torch.no_grad():
        net.conv2.weight[0, 0, 0, 0] += 0.5       # the layer moved: X_d reused, Z_d rebuilt
    sw = begin("bn2.weight")
    assert sw.x is x0 and sw.z is not z0
    sw.end()
    with torch.no_grad():
        net.conv1.weight[0, 0, 0, 0] += 0.5       # a layer before it moved: both rebuilt
    sw = begin("bn2.weight")
    assert sw.x is not x0
    sw.end()
    assert store.take() is not None and store.take() is None


class _NoStore:
    stash: dict = {}
    stashing = False

    def take(self):
        return None

    def put(self, **entry):
        pass


def test_fused_runs_equal_with_and_without_handing_caches_on():
    """Caches handed to the BatchNorm units and inputs stashed for shallower layers change
    nothing: the same weights, bit for bit, as building every cache from the data."""
    x, y = toy_data(90, seed=6)
    nets, stashed = [], []
    for store in (None, FusedStore(stash=False), _NoStore()):
        net = _paper_like(4)
        rso = RSO(net, cycles=2, batch_size=30, backend="fused",
                  generator=torch.Generator().manual_seed(2))
        rso._caches = store or rso._caches
        seen = []
        for _ in rso.run(x, y):
            seen.append(sorted(rso._caches.stash))
        nets.append(net)
        stashed.append(seen)
    assert [0] in stashed[0] and not any(stashed[1]) and not any(stashed[2])
    for other in nets[1:]:
        for p, q in zip(nets[0].parameters(), other.parameters()):
            assert torch.equal(p, q)


def test_stash_keeps_shallower_inputs_within_the_largest_layer_cache():
    net = models.paper_mnist(torch.Generator().manual_seed(0))
    plan = lower(net, torch.zeros(2, 1, 28, 28))
    names = [s.name for s in plan.steps]
    fc = names.index("fc")
    got = [names[i] for i in plan.stash_points(fc)]
    # inputs per sample: conv2 12,544, conv3/conv4 3,136, conv5/conv6 784; conv2's own caches
    # (12,544 + 12,544) are the largest pair, so everything from conv2 on fits
    assert got == ["conv6", "conv5", "conv4", "conv3", "conv2"]
    assert plan.stash_points(names.index("conv1")) == []


def _assert_program_forward_matches(net: nn.Module, x: torch.Tensor) -> ops.Program:
    """rso_ext::program_forward of the whole net against its modules, BatchNorm with running
    statistics (eval) and with batch statistics (train), the result contiguous; returns the
    last (train-mode) program."""
    plan = lower(net, x[:2])
    for train in (False, True):
        net.eval()
        for m in net.modules():   # BatchNorm statistics by mode; Dropout stays off
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train(train)
        prog = plan.forward_program(0, len(plan.steps))
        got = ops.program_forward(x, prog)
        with torch.no_grad():
            want = net(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert got.is_contiguous()
    return prog


@pytest.mark.parametrize("seed", range(6))
def test_program_forward_equals_the_modules(seed):
    """rso_ext::program_forward (the CPU passes that build the caches) against the modules,
    BatchNorm with running statistics (eval) and with batch statistics (train)."""
    net, _ = _random_net(seed)
    if seed == 0:   # plus a one-input-channel conv with 8 outputs (the blocked kernel)
        net = nn.Sequential(OrderedDict([("c", nn.Conv2d(1, 8, 3, padding=1)),
                                         ("b", nn.BatchNorm2d(8)), ("r", nn.ReLU()),
                                         ("p", nn.MaxPool2d(2)), ("f", nn.Flatten()),
                                         ("out", nn.Linear(8 * 36, 4))]))
    if seed == 1:   # and one-output-channel convs, stride 1 (12 wide) and 2 (narrow rows)
        net = nn.Sequential(OrderedDict([("c", nn.Conv2d(1, 5, 3, padding=1)),
                                         ("c1", nn.Conv2d(5, 1, 3, padding=1)),
                                         ("c2", nn.Conv2d(1, 3, 3, padding=1)),
                                         ("c3", nn.Conv2d(3, 1, 5, stride=2, padding=2)),
                                         ("c4", nn.Conv2d(1, 2, 3, padding=1, bias=False)),
                                         ("c5", nn.Conv2d(2, 1, 3, padding=1)),
                                         ("f", nn.Flatten()), ("out", nn.Linear(36, 4))]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(20, net[0].in_channels, 12, 12, generator=g)
    calibrate(net, x)
    prog = _assert_program_forward_matches(net, x)
    x0 = x.clone()
    ops.program_forward(x, ops.Program([ops.RELU], [0, 0, 0, 0], [0.0], [None] * 4))  # ReLU first
    assert torch.equal(x, x0), "program_forward must not write over its input"
    with pytest.raises(RuntimeError, match="program_forward: x must be float32 or float64"):
        ops.program_forward(x.long(), prog)
    with pytest.raises(RuntimeError, match="program_forward: op 0 has tensor 0 of Float"):
        ops.program_forward(x.double(), prog)


def _sweep_and_replay(net, x, y, name: str, batch: int = 16):
    """Sweep every weight of unit ``name`` in one ``fused_sweep`` call (shuffle sampler), then
    replay it from the same start weight by weight with the plain per-weight evaluation
    (``FusedSweeper.losses``) and the sweep's choices; returns (chosen, swept losses, replayed
    losses) and checks that the replay ends on the sweep's weights bit for bit."""
    calibrate(net, x)
    order = [m for _, m in execution_order(net, x[:2])]
    plan = lower(net, x[:2])
    unit = next(u for u in visit_units(net, x[:2]) if u.name == name)
    start = unit.param.data.clone()
    n = unit.param.numel()
    streams = SweepStreams.draw(torch.Generator().manual_seed(5), n, 0.5, len(x), batch)
    values = candidate_values(start.view(-1), streams.deltas, 0.99)
    with search_mode(net, order, unit.position):
        sw = FusedSweeper(plan, unit)
        sw.begin(x, y)
        chosen, losses = fused_sweep(sw, values, streams.batches(0, n))
        swept = unit.param.data.clone()
        sw.end()
        unit.param.data.copy_(start)
        sw = FusedSweeper(plan, unit)
        sw.begin(x, y)
        replay = []
        for k in range(n):
            replay.append(sw.losses(k, values[k], streams.batch(k)))
            sw.set(k, values[k, int(chosen[k])])
        sw.end()
    torch.testing.assert_close(unit.param.data, swept, rtol=0, atol=0)
    return chosen, losses, torch.stack(replay)


def test_a_pool_after_a_lazily_swept_layer_matches_the_per_weight_losses():
    # B=4 on 80 samples: the sweep recomputes channel o per minibatch (lazy_z) and the CPU
    # passes pool each minibatch's shared state straight from the rows of z with channel o
    # taken from the recomputed one (cpu::pool2d_rows; conv2 -> a 3x3 pool; conv4 would be
    # the CPU logits head's).
    # Replayed weight by weight (z updated per move), the losses must be the same: a pool
    # that read the stale channel o of z would part from the first accepted move on.
    g = torch.Generator().manual_seed(4)
    x = torch.randn(80, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (80,), generator=g)
    chosen, losses, replay = _sweep_and_replay(_pooled_strided_net(seed=3), x, y, "conv2.weight",
                                               batch=4)
    # the two round differently (a recomputed channel against one updated move by move), and
    # BatchNorm over 4 samples magnifies it; a stale channel o is off by orders more
    torch.testing.assert_close(losses, replay, rtol=2e-5, atol=1e-5)
    assert (chosen != 0).sum() > len(chosen) // 4


def test_logits_layer_sweep_with_the_pool_log_sum_exp_matches_per_weight_losses():
    # a pool (40) smaller than a neuron's minibatches (4 weights x 16): the sweep keeps the
    # other logits' log-sum-exp over the pool per neuron (head_evaluate.cpp, pool_rest_losses);
    # replayed weight by weight, the per-minibatch evaluation gives the same losses (up to
    # the rounding of z: the sweep recomputes feature o per minibatch, the replay updates it)
    x, y = toy_data(40)
    chosen, losses, replay = _sweep_and_replay(tiny_net(seed=3, bias=True), x, y, "fc.weight")
    torch.testing.assert_close(losses, replay, rtol=1e-6, atol=1e-6)
    assert (chosen != 0).any()


def _flatten_net(seed: int) -> nn.Sequential:
    """Two convs, the second reaching a hidden linear layer through Flatten (16 features per
    channel) and a max-pool: a channel's share of the next layer is a block of features."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 3, 3, padding=1, bias=False)), ("bn1", nn.BatchNorm2d(3)),
        ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(3, 3, 3, padding=1, bias=True)), ("bn2", nn.BatchNorm2d(3)),
        ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)), ("flat", nn.Flatten()),
        ("fc1", nn.Linear(48, 5)), ("relu3", nn.ReLU()), ("fc2", nn.Linear(5, 3))]))
    return models.he_init_(net, g)


@pytest.mark.parametrize("make,name", [(tiny_net, "conv1.weight"), (_flatten_net, "conv1.weight"),
                                       (_flatten_net, "conv2.weight"),
                                       (_pooled_strided_net, "conv1.weight"),
                                       (_pooled_strided_net, "conv2.weight")])
def test_per_neuron_states_of_recurring_minibatches_match_the_plain_evaluation(make, name):
    # pool 48, B=16: the shuffle sampler cycles through 3 minibatches, so each recurs within
    # every neuron and the sweep evaluates those weights on the next layer's output with the
    # neuron's channel left out, kept per (neuron, minibatch) (csrc/core/fused.cpp,
    # left_out_state; conv1 with one input channel also recomputes its channel per minibatch,
    # lazy_z). Replayed weight by weight, the plain evaluation gives the same losses and
    # decisions; its rounding differs, so bitwise equal losses would mean no state was used.
    # (A hidden linear layer before the output layer is a logits head's, on every backend.)
    x, y = toy_data(48, seed=6)
    chosen, losses, replay = _sweep_and_replay(make(seed=2), x, y, name)
    torch.testing.assert_close(losses, replay, rtol=RTOL, atol=1e-6)
    assert not torch.equal(losses, replay), "the sweep never used a per-neuron state"
    assert (chosen != 0).sum() > len(chosen) // 3
