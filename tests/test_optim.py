"""rso_ext.optim: the torch.optim-style forms. They match the class forms on the same seed, work for
models the class forms refuse (the generic path), round-trip their state and refuse bad
arguments."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rso_ext import data, optim
from rso_ext.methods import EvolutionStrategy, GeneticAlgorithm, SimulatedAnnealing, TicketFinder

from test_methods import mini_net


@pytest.fixture(scope="module")
def mnist():
    s = data.load_splits(val_size=0)
    return s.train_x[:300], s.train_y[:300]


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def summed_closure(net, x, y):
    def closure(idx):
        return F.cross_entropy(net(x[idx]).double(), y[idx], reduction="sum")
    return closure


def _assert_same_weights(a: nn.Module, b: nn.Module):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)


# -- optimizer form == class form ------------------------------------------------------------------
def test_ticket_finder_matches_the_class_form(mnist):
    x, y = mnist
    a, b = mini_net(bn=False, width=1), mini_net(bn=False, width=1)
    tf = TicketFinder(a, cycles=2, batch_size=50, sparsity=0.5, schedule="linear",
                      generator=_g(5))
    list(tf.run(x, y))
    opt = optim.TicketFinder(optim.visiting_order(b, x[:2], weights_only=True), sparsity=0.5,
                             cycles=2, schedule="linear", pool_size=len(x), batch_size=50,
                             generator=_g(5))
    b.train()
    while opt.sweeps < 2:                           # 32 weights a step, sweeps cut anywhere
        opt.step(summed_closure(b, x, y))
    _assert_same_weights(a, b)
    assert torch.equal(opt.masks()[0].view(-1), tf.masks["fc.weight"])
    assert not torch.equal(a.fc.weight, mini_net(bn=False, width=1).fc.weight)   # it moved


def test_simulated_annealing_matches_the_class_form(mnist):
    x, y = mnist
    a, b = mini_net(bn=False, width=1), mini_net(bn=False, width=1)
    sa = SimulatedAnnealing(a, cycles=2, batch_size=50, t0=1e-3, t_final=1e-4, generator=_g(2))
    accepted = sum(s.accepted for s in sa.run(x, y))
    opt = optim.SimulatedAnnealing(optim.visiting_order(b, x[:2]), cycles=2, t0=1e-3,
                                   t_final=1e-4, reduction="sum", pool_size=len(x),
                                   batch_size=50, generator=_g(2), weights_per_step=None)
    opt.step(summed_closure(b, x, y))
    opt.step(summed_closure(b, x, y))
    assert opt.sweeps == 2 and opt.moves == accepted
    _assert_same_weights(a, b)


def test_evolution_strategy_matches_the_class_form(mnist):
    x, y = mnist
    a, b = mini_net(), mini_net()
    es = EvolutionStrategy(a, cycles=1, generations=6, batch_size=60, population=10,
                           sigma=0.05, lr=0.03, generator=_g(3))
    list(es.run(x, y))
    opt = optim.EvolutionStrategy(b.parameters(), population=10, sigma=0.05, lr=0.03,
                                  pool_size=len(x), batch_size=60, generator=_g(3))
    b.train()                                       # BatchNorm on minibatch statistics, as ES
    for _ in range(6):
        opt.step(summed_closure(b, x, y))
    _assert_same_weights(a, b)


def test_genetic_algorithm_matches_the_class_form(mnist):
    x, y = mnist
    a, b = mini_net(), mini_net()
    ga = GeneticAlgorithm(a, cycles=1, generations=5, batch_size=60, population=8, parents=3,
                          sigma=0.05, generator=_g(4))
    list(ga.run(x, y))
    opt = optim.GeneticAlgorithm(b.parameters(), population=8, parents=3, sigma=0.05,
                                 pool_size=len(x), batch_size=60, generator=_g(4))
    b.train()
    for _ in range(5):
        opt.step(summed_closure(b, x, y))
    _assert_same_weights(a, b)
    torch.testing.assert_close(opt.extra["population"], ga.population)


# -- the generic path: any model ------------------------------------------------------------------
class LayerNormNet(nn.Module):
    """A model the class forms refuse (LayerNorm holds parameters, a functional residual)."""

    def __init__(self):
        super().__init__()
        g = _g(1)
        self.proj = nn.Linear(16, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        h = F.avg_pool2d(x, 7).flatten(1)
        h = self.norm(torch.relu(self.proj(h)))
        return self.head(h + h.roll(1, dims=1))


@pytest.mark.parametrize("make", [
    lambda p: optim.RandomSearch(p, cycles=1),
    lambda p: optim.SimulatedAnnealing(p, cycles=1, t0=1e-3),
    lambda p: optim.TicketFinder(p, cycles=1, sparsity=0.3),
    lambda p: optim.EvolutionStrategy(p, population=20, sigma=0.05, lr=0.03),
    lambda p: optim.GeneticAlgorithm(p, population=20, sigma=0.05),
], ids=["rso", "sa", "ticket", "es", "ga"])
def test_generic_path_decreases_the_loss(make, mnist):
    x, y = mnist
    net = LayerNormNet()
    xb, yb = x[:100], y[:100]

    def closure():
        return F.cross_entropy(net(xb), yb)

    with torch.no_grad():
        before = float(closure())
    opt = make(net.parameters())
    for _ in range(30):
        opt.step(closure)
    while isinstance(opt, optim._PerWeight) and opt.sweeps < 1:
        opt.step(closure)
    with torch.no_grad():
        after = float(closure())
    assert after < before - 0.1, (before, after)


# -- state ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda p, n: optim.TicketFinder(p, cycles=3, sparsity=0.4, schedule="linear", pool_size=n,
                                    batch_size=40, generator=_g(8), weights_per_step=37),
    lambda p, n: optim.EvolutionStrategy(p, population=6, sigma=0.05, pool_size=n,
                                         batch_size=40, generator=_g(8)),
    lambda p, n: optim.GeneticAlgorithm(p, population=6, sigma=0.05, pool_size=n,
                                        batch_size=40, generator=_g(8)),
    lambda p, n: optim.SimulatedAnnealing(p, cycles=3, pool_size=n, batch_size=40,
                                          generator=_g(8), weights_per_step=37),
    lambda p, n: optim.RandomSearch(p, cycles=3, pool_size=n, batch_size=40, generator=_g(8),
                                    weights_per_step=None),
], ids=["ticket", "es", "ga", "sa", "rso-whole-sweeps"])
def test_state_dict_round_trip(make, mnist):
    x, y = mnist

    def micro_net(init=None):                     # 170 parameters: fast per-weight sweeps
        net = nn.Sequential(nn.AvgPool2d(7), nn.Flatten(), nn.Linear(16, 10))
        if init is not None:
            net.load_state_dict(init)
        return net.requires_grad_(False)

    full = micro_net()
    initial = copy.deepcopy(full.state_dict())
    o_full = make(list(full.parameters()), len(x))
    # per-weight: 37 of the 170 weights a step, so the state is saved in the middle of a tensor
    n = {None: 2, 37: 10}[o_full.weights_per_step] if isinstance(o_full, optim._PerWeight) else 4
    for _ in range(n):
        o_full.step(summed_closure(full, x, y))

    part = micro_net(initial)
    o_part = make(list(part.parameters()), len(x))
    for _ in range(n - 1):
        o_part.step(summed_closure(part, x, y))
    state = copy.deepcopy(o_part.state_dict())
    weights = copy.deepcopy(part.state_dict())

    again = micro_net(weights)
    o_again = make(list(again.parameters()), len(x))
    o_again.load_state_dict(state)
    o_again.step(summed_closure(again, x, y))
    _assert_same_weights(full, again)


# -- bad arguments ---------------------------------------------------------------------------------
def test_bad_arguments_are_named():
    p = list(mini_net().parameters())
    with pytest.raises(ValueError, match="pool_size and batch_size go together"):
        optim.TicketFinder(p, pool_size=10)
    with pytest.raises(ValueError, match="batch_size must be an int in"):
        optim.EvolutionStrategy(p, pool_size=10, batch_size=11)
    with pytest.raises(ValueError, match="population must be an even int"):
        optim.EvolutionStrategy(p, population=7)
    with pytest.raises(ValueError, match="sparsity"):
        optim.TicketFinder(p, sparsity=-0.1)
    with pytest.raises(ValueError, match="reduction='sum' needs batch_size"):
        optim.SimulatedAnnealing(p, reduction="sum")
    with pytest.raises(ValueError, match="sampler"):
        optim.RandomSearch(p, sampler="sobol")
    with pytest.raises(ValueError, match="cycles"):
        optim.RandomSearch(p, cycles=0)
    with pytest.raises(ValueError, match="elite"):
        optim.GeneticAlgorithm(p, population=4, elite=4)
    with pytest.raises(ValueError, match="needs a closure"):
        optim.EvolutionStrategy(p).step()
    with pytest.raises(ValueError, match="no 'rso_ext' entry"):
        optim.EvolutionStrategy(p).load_state_dict({"state": {}, "param_groups": []})


# -- a step per minibatch --------------------------------------------------------------------------
def _per_weight(kind, params, n, wps):
    common = dict(cycles=2, pool_size=n, batch_size=40, generator=_g(6), weights_per_step=wps)
    if kind == "rso":
        return optim.RandomSearch(params, **common)
    if kind == "sa":
        return optim.SimulatedAnnealing(params, t0=1e-3, **common)
    return optim.TicketFinder(params, sparsity=0.4, schedule="linear", **common)


@pytest.mark.parametrize("kind", ["rso", "sa", "ticket"])
def test_bounded_steps_decide_as_whole_sweeps(kind, mnist):
    """Steps of 7 weights (cutting tensors anywhere, crossing from one tensor to the next) reach
    the weights of one-sweep steps; a step never spans two sweeps."""
    x, y = mnist
    nets = [mini_net(bn=False, width=1) for _ in range(2)]
    opts = [_per_weight(kind, list(net.parameters()), len(x), wps)
            for net, wps in zip(nets, (None, 7))]
    for opt, net in zip(opts, nets):
        sweeps_seen = []
        while opt.sweeps < 2:
            before = opt.sweeps
            opt.step(summed_closure(net, x, y))
            assert opt.sweeps - before <= 1
            sweeps_seen.append(opt.sweeps)
        assert opt.pos is None
    total = sum(p.numel() for p in nets[0].parameters())
    assert opts[0].steps == 2 and opts[1].steps == 2 * -(-total // 7)
    assert opts[0].visited == opts[1].visited == 2 * total
    _assert_same_weights(nets[0], nets[1])
    assert opts[0].moves == opts[1].moves > 0


class DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(16, 12), nn.Dropout(0.5), nn.Linear(12, 10)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(F.avg_pool2d(x, 7).flatten(1)))))


def test_candidates_of_one_weight_see_the_same_dropout(mnist):
    """sigma=0: the three candidates of a weight are one value, so under the same randomness the
    closure returns one loss three times; the next weight draws a new mask."""
    x, y = mnist
    torch.manual_seed(0)
    net = DropoutNet().train()
    seen = []

    def closure():
        loss = F.cross_entropy(net(x[:64]), y[:64])
        seen.append(float(loss))
        return loss

    opt = optim.RandomSearch(net.parameters(), sigma=0.0, weights_per_step=5)
    returned = opt.step(closure)
    assert len(seen) == 15
    per_weight = [seen[i:i + 3] for i in range(0, 15, 3)]
    assert all(a == b == c for a, b, c in per_weight), per_weight
    assert len({w[0] for w in per_weight}) > 1              # new dropout masks weight to weight
    assert float(returned) == per_weight[-1][0]


def test_step_returns_the_loss_of_the_parameters_it_leaves(mnist):
    x, y = mnist
    net = LayerNormNet()

    def closure():
        return F.cross_entropy(net(x[:100]), y[:100])

    opt = optim.RandomSearch(net.parameters())
    for _ in range(3):
        loss = opt.step(closure)
        assert torch.is_tensor(loss)
        with torch.no_grad():
            assert float(loss) == float(closure())


def test_state_of_whole_sweep_steps_still_loads(mnist):
    """A state saved when one step was one sweep (no 'sweeps', no 'pos') counts its steps as
    sweeps."""
    x, y = mnist
    net = mini_net(bn=False, width=1)
    opt = optim.RandomSearch(list(net.parameters()), cycles=3, pool_size=len(x), batch_size=40,
                             weights_per_step=None)
    opt.step(summed_closure(net, x, y))
    state = opt.state_dict()
    for k in ("sweeps", "visited", "moves", "pos"):
        del state["rso_ext"][k]
    again = optim.RandomSearch(list(net.parameters()), cycles=3, pool_size=len(x),
                               batch_size=40)
    again.load_state_dict(state)
    assert again.sweeps == 1 and again.cycle == 1 and again.pos is None


def test_weights_per_step_is_checked():
    p = list(mini_net().parameters())
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="weights_per_step"):
            optim.TicketFinder(p, weights_per_step=bad)
