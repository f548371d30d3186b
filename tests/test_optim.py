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
    for _ in range(2):
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
                                   batch_size=50, generator=_g(2))
    assert opt.step(summed_closure(b, x, y)) + opt.step(summed_closure(b, x, y)) == accepted
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
    steps = 1 if isinstance(opt, optim._PerWeight) else 30
    for _ in range(steps):
        opt.step(closure)
    with torch.no_grad():
        after = float(closure())
    assert after < before - 0.1, (before, after)


# -- state ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda p, n: optim.TicketFinder(p, cycles=3, sparsity=0.4, schedule="linear", pool_size=n,
                                    batch_size=40, generator=_g(8)),
    lambda p, n: optim.EvolutionStrategy(p, population=6, sigma=0.05, pool_size=n,
                                         batch_size=40, generator=_g(8)),
    lambda p, n: optim.GeneticAlgorithm(p, population=6, sigma=0.05, pool_size=n,
                                        batch_size=40, generator=_g(8)),
    lambda p, n: optim.SimulatedAnnealing(p, cycles=3, pool_size=n, batch_size=40,
                                          generator=_g(8)),
], ids=["ticket", "es", "ga", "sa"])
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
    n = 2 if isinstance(o_full, optim._PerWeight) else 4
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
