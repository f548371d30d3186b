"""The fused backend on models that are not an nn.Sequential (rso_ext/fused/lower_graph.py,
csrc/core/fused_dag.cpp): paper_cifar and random residual nets against the pure-PyTorch
reference, seeded sweeps against backend="torch", and the planner's refusals."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rso_ext import RSO, memory, models, ops
from rso_ext.batchnorm import calibrate, search_mode
from rso_ext.fused import CacheStore, FusedSweeper, PlanError, lower
from rso_ext.ops import ADD, INPUT, LINEAR, SAVE
from rso_ext.fused.sweeper import fused_sweep_estimate
from rso_ext.streams import SweepStreams
from rso_ext.visit import execution_order, visit_units

from helpers import BlogStyle, CatDag, SmallRes, TinyDag, toy_data
from test_fused import _check_all_units

# every test runs through the hand-written CPU passes and through the device-generic code of
# the CUDA backend (conftest.py, code_paths)
pytestmark = pytest.mark.usefixtures("one_thread", "code_paths")


def test_every_unit_of_paper_cifar_matches_the_reference():
    """Every unit of paper_cifar (57,104 parameters in 31 units), two or three weights each:
    the fused losses equal the whole-model forward's within test_fused.RTOL."""
    torch.manual_seed(0)
    net = models.paper_cifar(torch.Generator().manual_seed(1))
    x = torch.randn(24, 3, 32, 32)
    y = torch.randint(0, 10, (24,))
    _check_all_units(net, x, y, per_unit=1)


def test_paper_cifar_programs():
    """The visiting order puts the 1x1 shortcut and its BN between conv5 (convs.4) and conv4
    (convs.3) -- the projection runs right before convs.4 -- and each unit's program joins the
    residual branches as designed: conv3's skip (conv1's branch) and conv8's are side inputs,
    conv4's is computed per minibatch from a cached input (shortcut_bn uses minibatch
    statistics while convs.3 is swept), the shortcut adds the cached main path."""
    net = models.paper_cifar(torch.Generator().manual_seed(0))
    x = torch.zeros(2, 3, 32, 32)
    units = visit_units(net, x)
    names = [u.name for u in units]
    i = names.index("shortcut.weight")
    assert names[i - 3:i + 4] == ["convs.4.weight", "bns.4.bias", "bns.4.weight",
                                  "shortcut.weight", "shortcut_bn.bias", "shortcut_bn.weight",
                                  "convs.3.weight"]
    plan = lower(net, x)
    assert plan.dag and lower(models.paper_mnist(), torch.zeros(2, 1, 28, 28)).dag is False
    by = {u.name: u for u in units}
    owner = {n: plan.steps[plan.owner(by[n])].name for n in ("shortcut_bn.weight", "bns.4.bias",
                                                              "bns.2.weight")}
    assert owner == {"shortcut_bn.weight": "shortcut", "bns.4.bias": "convs.4",
                     "bns.2.weight": "convs.2"}

    def sides(name):
        prog = plan.program(by[name])
        return [(prog.program.kinds[op], plan.steps[n].name) for op, n in prog.sides]

    assert sides("convs.1.weight") == [(ADD, "bns.0")]           # conv3 += conv1 branch
    assert sides("convs.2.weight") == [(ADD, "bns.0")]
    assert sides("convs.3.weight") == [(INPUT, "shortcut")]      # then shortcut_bn per batch
    assert sides("shortcut.weight") == [(ADD, "convs.4")]
    assert sides("convs.0.weight") == []                         # every branch moves with it
    prog = plan.program(by["convs.0.weight"])
    assert prog.program.kinds.count(SAVE) == 6 and prog.program.kinds.count(ADD) == 4
    fc = plan.program(by["fc.weight"])
    assert fc.program.kinds == (LINEAR,) and fc.sides == ()


def test_a_pass_over_every_unit_of_paper_cifar_makes_the_decisions_of_torch():
    """Four weights of every unit of paper_cifar, in visiting order, on both backends from the
    same state and streams: the same accepted moves and weights, except shortcut_bn.bias,
    which cannot change the loss (its add feeds bns.4, whose batch statistics remove any
    per-channel constant), so its decisions are float noise on either backend."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(48, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (48,), generator=g)
    for c in range(10):                       # something to learn: a colour shift per class
        x[y == c, c % 3] += 0.3 * (c // 3 + 1)
    runs = {}
    for backend in ("torch", "fused"):
        net = models.paper_cifar(torch.Generator().manual_seed(0))
        rso = RSO(net, cycles=1, batch_size=16, calib_size=32, backend=backend,
                  generator=torch.Generator().manual_seed(1))
        stats = [rso.sweep_unit(i, x, y, weights=4) for i in range(31)]
        assert rso.backend == backend
        runs[backend] = (net, {s.layer: s.accepted for s in stats})
    (a, acc_a), (b, acc_b) = runs["torch"], runs["fused"]
    noise = "shortcut_bn.bias"
    assert {k: v for k, v in acc_a.items() if k != noise} == \
        {k: v for k, v in acc_b.items() if k != noise}
    assert sum(acc_a.values()) > 60
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if name != noise:
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


class _ResNet(nn.Module):
    """A random small residual net of the supported ops. Blocks, each on h:
    0 identity add ``conv(relu(h)) + h``; 1 projection ``conv(relu(h)) + bn(proj(h))`` (1x1
    conv, maybe stride 2 and more channels, computed before or after the main conv); 2 a skip
    that starts before a pool ``pool(conv(relu(h))) + pool(h)``; 3 two channel-local branches of
    one conv ``relu(bn(conv(h))) + bn(conv(h))``; then maybe a pool after the add (paper_cifar's
    way) and a BN. Head: GAP or a flattened map, maybe a linear residual
    ``relu(fc0(f)) + f`` (with BatchNorm1d after GAP), then the output linear."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        r = lambda n: int(torch.randint(0, n, (1,), generator=g))  # noqa: E731
        self.cin = r(2) + 1
        c, hw = [2, 3, 4][r(3)], 12
        self.stem = nn.Conv2d(self.cin, c, 3, padding=1, bias=bool(r(2)))
        self.stem_bn = nn.BatchNorm2d(c)
        self.blocks, self.convs, self.bns, self.projs = [], nn.ModuleList(), nn.ModuleList(), \
            nn.ModuleDict()
        self.pools = nn.ModuleList([nn.AvgPool2d(2), nn.MaxPool2d(2), nn.AvgPool2d(3, 2, 1)])
        for i in range(2 + r(2)):
            mode = r(4)
            cout = [2, 3, 5][r(3)] if mode == 1 else c
            stride = 2 if mode == 1 and hw >= 6 and r(2) else 1
            self.convs.append(nn.Conv2d(c, cout, 3, stride, 1, bias=bool(r(2))))
            self.bns.append(nn.BatchNorm2d(cout))
            hw = (hw - 1) // stride + 1
            if mode == 1:
                self.projs[str(i)] = nn.Sequential(nn.Conv2d(c, cout, 1, stride, bias=False),
                                                   nn.BatchNorm2d(cout))
            pool = r(3) if mode == 2 or (r(2) and hw >= 4) else None
            if pool is not None:
                hw = (hw + 2 * (pool == 2) - (3 if pool == 2 else 2)) // 2 + 1
            self.blocks.append((mode, pool, bool(r(2))))
            c = cout
        self.flat_map = bool(r(2)) and c * hw * hw <= 48
        feat = c * hw * hw if self.flat_map else c
        self.lin_res = bool(r(2))
        self.fc0 = nn.Linear(feat, feat, bias=bool(r(2))) if self.lin_res else None
        self.bnf = nn.BatchNorm1d(feat) if self.lin_res and not self.flat_map and r(2) else None
        self.out = nn.Linear(feat, 4, bias=bool(r(2)))
        models.he_init_(self, g)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.weight.uniform_(0.5, 1.5, generator=g)
                    m.bias.uniform_(-0.3, 0.3, generator=g)
                elif getattr(m, "bias", None) is not None:
                    m.bias.uniform_(-0.2, 0.2, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem_bn(self.stem(x))
        for i, (mode, pool, proj_first) in enumerate(self.blocks):
            conv, bn = self.convs[i], self.bns[i]
            skip = self.projs[str(i)](h) if mode == 1 and proj_first else None
            z = conv(torch.relu(h))
            if mode == 0:
                z = z + h
            elif mode == 1:
                z = z + (skip if skip is not None else self.projs[str(i)](h))
            elif mode == 2:
                z = self.pools[pool](z) + self.pools[pool](h)
            else:
                b = bn(z)
                z = torch.relu(b) + b
            if pool is not None and mode != 2:
                z = self.pools[pool](z)
            h = z if mode == 3 else bn(z)
        f = h.flatten(1) if self.flat_map else torch.flatten(h.mean((2, 3), keepdim=True), 1)
        if self.fc0 is not None:
            a = self.fc0(f)
            f = torch.relu(self.bnf(a) if self.bnf is not None else a) + f
        return self.out(f)


@pytest.mark.parametrize("seed", range(12))
def test_random_residual_nets_match_the_reference(seed):
    net = _ResNet(seed)
    g = torch.Generator().manual_seed(200 + seed)
    x = torch.randn(40, net.cin, 12, 12, generator=g)
    y = torch.randint(0, 4, (40,), generator=g)
    _check_all_units(net, x, y, per_unit=2)


def test_the_random_residual_nets_cover_every_block():
    """The seeds of the test above draw every block kind, both places of the projection, pools
    before and after an add, both heads and the linear residual with and without BN."""
    seen = set()
    for seed in range(8):
        net = _ResNet(seed)
        seen |= {("mode", m) for m, _, _ in net.blocks}
        seen |= {("proj_first", p) for m, _, p in net.blocks if m == 1}
        seen |= {("pool_after_add", pool is not None) for m, pool, _ in net.blocks if m != 2}
        seen |= {("flat_map", net.flat_map), ("lin_res", net.lin_res),
                 ("bnf", net.bnf is not None)}
    want = {("mode", m) for m in range(4)} | {(k, v) for k in ("proj_first", "pool_after_add",
                                                               "flat_map", "lin_res", "bnf")
                                              for v in (False, True)}
    assert want <= seen, want - seen


def test_tiny_dag_and_small_res_match_the_reference():
    x, y = toy_data(40, seed=3)
    for net in (TinyDag(seed=2), SmallRes(seed=4)):
        _check_all_units(net, x, y, per_unit=3)


@pytest.mark.parametrize("batch", [16, 2])
def test_z_cache_stays_exact_through_a_residual_sweep(batch):
    """As test_fused.test_z_cache_stays_exact_through_a_sweep, for the units of SmallRes whose
    programs read side inputs (conv2: bn1's branch; conv3: proj per minibatch; proj: conv3's
    output): per accepted move (B=16) and lazily per neuron (B=2)."""
    net = SmallRes(seed=5)
    x, y = toy_data(80)
    calibrate(net, x)
    order = [m for _, m in execution_order(net, x[:2])]
    plan = lower(net, x[:2])
    for unit in visit_units(net, x[:2]):
        if unit.module not in (net.conv2, net.conv3, net.proj):
            continue
        streams = SweepStreams.draw(torch.Generator().manual_seed(3), unit.param.numel(), 0.5,
                                    len(x), batch)
        with search_mode(net, order, unit.position):
            sw = FusedSweeper(plan, unit)
            sw.begin(x, y)
            assert sw.prog.program.kinds.count(ADD) >= 1
            accepted, _ = sw.run(0, unit.param.numel(), streams, 0.99)
            assert accepted > 0
            torch.testing.assert_close(sw.z, unit.module(sw.x), rtol=1e-5, atol=1e-5)
            sw.end()


def _decisions(monkeypatch):
    """Record the loss margins of the torch backend's decisions (rso_ext.sweep.choose)."""
    from rso_ext import sweep
    margins = []
    choose = sweep.choose

    def recording(losses):
        v = sorted(losses.tolist())
        margins.append(min(b - a for a, b in zip(v, v[1:])))
        return choose(losses)

    monkeypatch.setattr(sweep, "choose", recording)
    return margins


def test_seeded_sweeps_of_a_residual_net_make_the_same_decisions_as_the_reference(monkeypatch):
    x, y = toy_data(120, seed=4)
    margins = _decisions(monkeypatch)
    runs = {}
    for backend in ("torch", "fused"):
        net = SmallRes(seed=3)
        rso = RSO(net, cycles=2, batch_size=40, sampler="random", backend=backend,
                  generator=torch.Generator().manual_seed(9))
        stats = list(rso.run(x, y))
        assert rso.backend == backend
        runs[backend] = (net, [s.accepted for s in stats], [s.mean_loss for s in stats])
    (a, acc_a, loss_a), (b, acc_b, loss_b) = runs["torch"], runs["fused"]
    # the comparison means something only where the margins are clear of float noise
    margins.sort()
    assert len(margins) == 2 * sum(p.numel() for p in a.parameters())
    assert margins[len(margins) // 10] > 1e-6
    assert acc_a == acc_b and sum(acc_a) > 100
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(torch.tensor(loss_b), torch.tensor(loss_a), rtol=1e-6, atol=0)


def test_a_blog_style_forward_matches_the_reference():
    """F.max_pool2d, F.dropout, torch.flatten and a final F.log_softmax (the PyTorch MNIST
    example's forward): every unit's fused losses equal the whole model's."""
    x, y = toy_data(40, seed=5)
    _check_all_units(BlogStyle(seed=1), x, y, per_unit=3)


def test_seeded_sweeps_of_a_blog_style_net_make_the_same_decisions_as_the_reference(monkeypatch):
    x, y = toy_data(120, seed=6)
    margins = _decisions(monkeypatch)
    nets = {}
    for backend in ("torch", "fused"):
        net = BlogStyle(seed=2)
        rso = RSO(net, cycles=2, batch_size=40, backend=backend,
                  generator=torch.Generator().manual_seed(4))
        accepted = sum(s.accepted for s in rso.run(x, y))
        assert rso.backend == backend and accepted > 50
        nets[backend] = net
    margins.sort()
    assert margins[len(margins) // 10] > 1e-6
    for (name, p), q in zip(nets["torch"].named_parameters(), nets["fused"].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


def test_caches_are_handed_to_the_batchnorm_units_of_a_layer():
    net = SmallRes(seed=1)
    x, y = toy_data(60, seed=2)
    calibrate(net, x)
    order = [m for _, m in execution_order(net, x[:2])]
    plan = lower(net, x[:2])
    units = {u.name: u for u in visit_units(net, x[:2])}
    store = CacheStore()

    def begin(name):
        sw = FusedSweeper(plan, units[name], store=store)
        with search_mode(net, order, units[name].position):
            sw.begin(x, y)
        return sw

    sw = begin("conv3.weight")
    x0, z0, n0 = sw.x, sw.z, sw.cache_bytes()
    assert n0 > 2 * x0.numel() * 4          # X_d, Z_d and proj's output (a side input)
    sw.end()
    sw = begin("bn3.bias")                   # after the layer's own sweep Z_d is rebuilt
    assert sw.x is x0 and sw.z is not z0
    torch.testing.assert_close(sw.z, net.conv3(x0))
    z0 = sw.z
    sw.end()
    sw = begin("bn3.bias")                   # nothing changed: all reused
    assert sw.x is x0 and sw.z is z0
    sw.end()
    with torch.no_grad():
        net.conv3.weight[0, 0, 0, 0] += 0.5   # the layer moved: Z_d rebuilt
    sw = begin("bn3.weight")
    assert sw.x is x0 and sw.z is not z0
    torch.testing.assert_close(sw.z, net.conv3(x0))
    sw.end()
    with torch.no_grad():
        net.proj.weight[0, 0, 0, 0] += 0.5    # a side input's layer moved: all rebuilt
    sw = begin("bn3.weight")
    assert sw.x is not x0
    sw.end()


def test_auto_lowers_paper_cifar_and_the_memory_check_counts_side_inputs():
    torch.manual_seed(0)
    x = torch.randn(24, 3, 32, 32)
    y = torch.randint(0, 10, (24,))
    rso = RSO(models.paper_cifar(torch.Generator().manual_seed(0)), cycles=1, batch_size=8,
              calib_size=16, backend="auto")
    i = [u.name for u in visit_units(rso.model, x[:2])].index("convs.1.weight")
    stats = rso.sweep_unit(i, x, y, weights=3)
    assert rso.backend == "fused" and stats.weights == 3
    unit = rso.units[i]
    sw = rso.sweeper(unit)
    trace = memory.trace_footprint(rso.model, x[:2])
    total, detail = memory.sweep_estimate(rso.model, unit.module, sw, 1000, 8, trace=trace)
    plain, _ = fused_sweep_estimate(trace, unit.module, 1000, 8)
    side, saved = rso.plan.side_widths(unit)
    assert side == 16 * 32 * 32 and saved > 0           # h0 (bns.0's output)
    assert total >= plain + 1000 * 4 * side and "side inputs" in detail


# -- the planner's refusals ---------------------------------------------------------------------
class _Mul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(72, 3)

    def forward(self, x):
        return self.fc((self.conv(x) * 0.5).flatten(1))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.conv(x), x], 1)


class _Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.block = _Block()
        self.fc = nn.Linear(144, 3)

    def forward(self, x):
        return self.fc(self.block(self.conv(x)).flatten(1))


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.stem = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(72, 3)

    def forward(self, x):
        h = self.stem(x)
        return self.fc(self.conv(self.conv(h)).flatten(1))


class _Broadcast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3)
        self.b = nn.Conv2d(1, 1, 3)
        self.fc = nn.Linear(72, 3)

    def forward(self, x):
        return self.fc((self.a(x) + self.b(x)).flatten(1))


class _Gelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.act = nn.GELU()
        self.fc = nn.Linear(72, 3)

    def forward(self, x):
        h = self.conv(x)
        return self.fc((self.act(h) + h).flatten(1))


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(72, 3)

    def forward(self, x):
        h = self.conv(x)
        if h.sum() > 0:                      # data-dependent control flow
            h = h + h
        return self.fc(h.flatten(1))


class _LogSoftmaxInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(72, 3)

    def forward(self, x):
        return self.fc(torch.nn.functional.log_softmax(self.conv(x), dim=1).flatten(1))


class _CeilPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(18, 3)

    def forward(self, x):
        return self.fc(torch.nn.functional.max_pool2d(self.conv(x), 2, ceil_mode=True)
                       .flatten(1))


@pytest.mark.parametrize("build, text", [
    (CatDag, r"module '<root>' \(CatDag\): the function torch.cat \(fx node 'cat'\) is outside "
             "the fused op set"),
    (_Mul, r"module '<root>' \(_Mul\): the function operator.mul \(fx node 'mul'\)"),
    (_Nested, r"module 'block' \(_Block\): the function torch.cat"),
    (_Shared, r"module 'conv' \(Conv2d\) is called more than once"),
    (_Broadcast, r"an add of tensors of shapes \(2, 2, 6, 6\) and \(2, 1, 6, 6\)"),
    (_Gelu, r"module 'act' \(GELU\) is outside the fused op set"),
    (_Branchy, r"module '<root>' \(_Branchy\): torch.fx cannot trace its forward"),
    (_LogSoftmaxInside, r"log_softmax\(dim=1\) that is not the last op over the classes "
                        r"\(fx node 'log_softmax'\)"),
    (_CeilPool, r"module 'max_pool2d' \(MaxPool2d\): ceil_mode=True is not supported"),
], ids=["cat", "mul", "nested", "shared", "broadcast", "gelu", "untraceable", "log_softmax",
        "ceil_pool"])
def test_the_planner_names_what_it_cannot_lower_in_a_traced_forward(build, text):
    with pytest.raises(PlanError, match=text):
        lower(build(), torch.zeros(2, 1, 8, 8))


def test_program_forward_refuses_dag_ops():
    with pytest.raises(RuntimeError, match="program_forward: Save/Load/Input/Add"):
        ops.program_forward(torch.zeros(2, 3), ops.Program([SAVE], [0, 0, 0, 0], [0.0], [None] * 4))


class _StrayBN(nn.Module):
    """bn follows c2 in execution order (so rso_ext.visit groups it with c2) but normalises c1's
    output: no channel-local chain from c2 reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 3, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(1, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        a, b = self.c1(x), self.c2(x)
        return self.fc((self.bn(a) + b).mean((2, 3)))


def test_a_unit_the_graph_cannot_sweep_is_refused_before_the_run():
    x, y = toy_data(30)
    rso = RSO(_StrayBN(), cycles=1, batch_size=10, backend="auto")
    rso.sweep_unit(0, x, y, weights=2)
    assert rso.backend == "torch"
    rso = RSO(_StrayBN(), cycles=1, batch_size=10, backend="fused")
    with pytest.raises(PlanError, match="BatchNorm 'bn.bias' is not in the channel-local chain "
                                        "of its layer 'c2'"):
        next(rso.run(x, y))
