"""The gradient-free family (rso_ext.methods): each method learns on a small real problem
(embedded MNIST), resumes exactly from its state_dict, refuses bad arguments by name, and runs
from the CLI."""
from __future__ import annotations

import json
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rso_ext import batchnorm, cli, data, models
from rso_ext.methods import (DFO, EvolutionStrategy, GeneticAlgorithm, SimulatedAnnealing,
                             TicketFinder, select_params)
from rso_ext.methods.es import centered_ranks, draw_noise
from rso_ext.methods.sa import accept, temperature
from rso_ext.methods.ticket import kept_cap, target_sparsity
from rso_ext.streams import SweepStreams
from helpers import mnist_root


def mini_net(seed: int = 0, bn: bool = True, width: int = 4) -> nn.Sequential:
    """28x28 -> avg-pool 4 -> conv 1->width 3x3 stride 2 (+BN) -> ReLU -> linear 9*width->10:
    every layer kind of the paper nets, 396 weights at width 4, fast enough for per-weight methods
    in tests."""
    layers = [("pool0", nn.AvgPool2d(4)),
              ("conv1", nn.Conv2d(1, width, 3, stride=2, bias=False))]
    if bn:
        layers.append(("bn1", nn.BatchNorm2d(width)))
    layers += [("relu1", nn.ReLU()), ("flatten", nn.Flatten()),
               ("fc", nn.Linear(9 * width, 10, bias=False))]
    return models.he_init_(nn.Sequential(OrderedDict(layers)), torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def mnist():
    s = data.load_splits(val_size=0)
    return s.train_x[:400], s.train_y[:400]


@torch.no_grad()
def train_loss(net: nn.Module, x, y) -> float:
    """Mean cross-entropy on the training images, BatchNorm calibrated on them (eval mode)."""
    batchnorm.calibrate(net, x)
    return float(F.cross_entropy(net(x).double(), y))


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


FACTORIES = {
    "sa": lambda net, g: SimulatedAnnealing(net, cycles=2, batch_size=50, generator=g),
    "ticket": lambda net, g: TicketFinder(net, cycles=2, batch_size=50, sparsity=0.5,
                                          generator=g),
    "es": lambda net, g: EvolutionStrategy(net, cycles=2, generations=25, batch_size=100,
                                           population=20, sigma=0.05, lr=0.03, generator=g),
    "ga": lambda net, g: GeneticAlgorithm(net, cycles=2, generations=25, batch_size=100,
                                          population=20, parents=5, sigma=0.05, generator=g),
    "dfo": lambda net, g: DFO(net, cycles=2, generations=20, batch_size=100, population=10,
                              sigma=0.1, optimizer="DiagonalCMA", generator=g),
}


def _need(method):
    if method == "dfo":
        pytest.importorskip("nevergrad")


# -- each method learns ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(FACTORIES))
def test_method_decreases_training_loss(method, mnist):
    _need(method)
    x, y = mnist
    net = mini_net()
    before = train_loss(net, x, y)
    search = FACTORIES[method](net, _g())
    stats = list(search.run(x, y))
    assert search.done and stats[-1].cycle_done and stats[-1].cycle == 1
    after = train_loss(search.calibrate(x), x, y)
    assert after < before - 0.15, (method, before, after)


def test_ticket_keeps_initial_weights_and_meets_the_cap(mnist):
    x, y = mnist
    net = mini_net()
    w0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    tf = TicketFinder(net, cycles=2, batch_size=50, sparsity=0.6, schedule="linear",
                      generator=_g())
    stats = list(tf.run(x, y))
    assert [s.layer for s in stats[:2]] == ["fc.weight", "conv1.weight"]   # weights only
    assert [s.target for s in stats] == [0.3, 0.3, 0.6, 0.6]
    for s in stats:
        assert s.sparsity >= s.target - 1e-12
    for name in ("fc.weight", "conv1.weight"):
        w = dict(net.named_parameters())[name].detach()
        assert torch.all((w == 0) | (w == w0[name]))
        assert torch.equal(tf.masks[name].view(w.shape), w != 0)
        assert 1 - tf.masks[name].double().mean() >= 0.6 - 1e-12
    assert torch.equal(net.bn1.weight, w0["bn1.weight"])          # BN stays at init
    assert tf.sparsity()["total"] >= 0.6 - 1e-12


def test_ticket_signed_constant_init(mnist):
    x, y = mnist
    net = mini_net()
    tf = TicketFinder(net, cycles=1, batch_size=50, sparsity=0.3, init="signed_constant",
                      generator=_g())
    list(tf.run(x, y))
    w = net.conv1.weight.detach()
    c = math.sqrt(2 / 9)
    assert torch.allclose(w[w != 0].abs(), torch.full_like(w[w != 0], c))
    assert torch.allclose(tf.w_init["conv1.weight"].abs(), torch.full_like(w, c))


def test_schedules():
    assert kept_cap(10, 0.5) == 5 and kept_cap(10, 0.0) == 10 and kept_cap(7, 0.5) == 3
    assert target_sparsity(0.8, 0, 4, "linear") == pytest.approx(0.2)
    assert target_sparsity(0.8, 3, 4, "linear") == pytest.approx(0.8)
    assert temperature(1e-2, 1e-4, 0, 3) == pytest.approx(1e-2)
    assert temperature(1e-2, 1e-4, 1, 3) == pytest.approx(1e-3)
    assert temperature(1e-2, 1e-4, 2, 3) == pytest.approx(1e-4)
    assert temperature(1.0, 0.0, 1, 3, "linear") == pytest.approx(0.5)


def test_metropolis_rule():
    assert accept(-1e-9, 0.999, 0.0)                  # improvements always
    assert not accept(0.0, 0.5, 0.0)                  # T = 0: greedy, ties keep w'
    assert accept(0.01, math.exp(-1) - 1e-6, 0.01) and not accept(0.01, math.exp(-1) + 1e-6, 0.01)
    assert not accept(float("nan"), 0.0, 1.0) and not accept(float("inf"), 0.0, 1.0)


def test_sa_draws_uniforms_right_after_the_streams(mnist):
    x, y = mnist
    net = mini_net(bn=False)
    sa = SimulatedAnnealing(net, cycles=1, batch_size=50, generator=_g(4))
    sa.sweep_unit(0, x, y, weights=3)
    g = _g(4)
    n = net.fc.weight.numel()
    sigma = math.sqrt(2 / 36)
    SweepStreams.draw(g, n, sigma, len(x), 50)
    assert torch.equal(sa._uniforms, torch.rand(n, generator=g, dtype=torch.float64))
    assert torch.equal(sa.generator.get_state(), g.get_state())


def test_es_pieces():
    g = _g(1)
    eps = draw_noise(g, 6, 4)
    assert torch.equal(eps[:3], -eps[3:])
    u = centered_ranks(torch.tensor([3.0, 1.0, 2.0, 1.0], dtype=torch.float64))
    assert u.tolist() == pytest.approx([-0.5, 0.5, -0.5 + 1 / 3, 0.5 - 1 / 3])
    assert abs(float(u.sum())) < 1e-6


def test_select_params():
    net = mini_net()
    sample = torch.zeros(2, 1, 28, 28)
    assert select_params(net, "bn", sample) == ["bn1.weight", "bn1.bias"]
    assert select_params(net, "last", sample) == ["fc.weight"]
    assert select_params(net, "bn+last", sample) == ["bn1.weight", "bn1.bias", "fc.weight"]
    assert select_params(net, ["conv1"], sample) == ["conv1.weight"]
    assert select_params(net, lambda n: n.endswith("bias"), sample) == ["bn1.bias"]
    with pytest.raises(ValueError, match="unknown part 'convs'"):
        select_params(net, "bn+convs", sample)
    with pytest.raises(ValueError, match="no parameter is named or prefixed"):
        select_params(net, ["conv9"], sample)


def test_es_on_a_parameter_subset_leaves_the_rest(mnist):
    x, y = mnist
    net = mini_net()
    conv = net.conv1.weight.detach().clone()
    es = EvolutionStrategy(net, cycles=1, generations=3, batch_size=50, population=4,
                           params="bn+last", generator=_g())
    list(es.run(x, y))
    assert torch.equal(net.conv1.weight, conv)
    assert es.evaluations == 3 * 4 * 50


# -- state_dict round trips -----------------------------------------------------------------------
@pytest.mark.parametrize("method", list(FACTORIES))
def test_resume_from_state_dict_equals_uninterrupted_run(method, mnist):
    _need(method)
    x, y = mnist[0][:200], mnist[1][:200]
    full_net = mini_net(seed=2)
    full = FACTORIES[method](full_net, _g(7))
    stats = list(full.run(x, y))
    stop = len(stats) // 2 + 1                      # stops inside the second cycle

    net = mini_net(seed=2)
    first = FACTORIES[method](net, _g(7))
    for i, _ in enumerate(first.run(x, y)):
        if i + 1 == stop:
            state = first.state_dict()
            break
    resumed_net = mini_net(seed=99)                 # other weights: all must come from the state
    resumed = FACTORIES[method](resumed_net, _g(0))
    resumed.load_state_dict(state)
    assert resumed.cycle == 1
    rest = list(resumed.run(x, y))
    assert len(rest) == len(stats) - stop
    for (n, p), q in zip(full_net.named_parameters(), resumed_net.parameters()):
        assert torch.equal(p, q), (method, n)
    assert torch.equal(full.generator.get_state(), resumed.generator.get_state())


def test_load_state_dict_refuses_another_method_or_hyperparameters(mnist):
    x, y = mnist
    es = FACTORIES["es"](mini_net(), _g())
    next(iter(es.run(x, y)))
    state = es.state_dict()
    ga = FACTORIES["ga"](mini_net(), _g())
    with pytest.raises(ValueError, match="method 'es', not 'ga'"):
        ga.load_state_dict(state)
    other = EvolutionStrategy(mini_net(), cycles=2, generations=25, batch_size=100,
                              population=20, sigma=0.05, lr=0.1)
    with pytest.raises(ValueError, match="lr: saved 0.03 vs 0.1"):
        other.load_state_dict(state)
    sa = FACTORIES["sa"](mini_net(), _g())
    with pytest.raises(ValueError, match="method 'ticket', not 'sa'"):
        sa.load_state_dict(FACTORIES["ticket"](mini_net(), _g()).state_dict())


# -- bad arguments ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kw,msg", [
    (SimulatedAnnealing, dict(t0=-1.0), "t0"),
    (SimulatedAnnealing, dict(schedule="cosine"), "schedule"),
    (SimulatedAnnealing, dict(t0=1.0, t_final=0.0), "t0 and t_final"),
    (SimulatedAnnealing, dict(cycles=0), "cycles"),
    (TicketFinder, dict(sparsity=1.0), "sparsity"),
    (TicketFinder, dict(schedule="cubic"), "schedule"),
    (TicketFinder, dict(init="xavier"), "init"),
    (EvolutionStrategy, dict(population=5), "population"),
    (EvolutionStrategy, dict(sigma=0.0), "sigma"),
    (EvolutionStrategy, dict(lr=-1.0), "lr"),
    (EvolutionStrategy, dict(optimizer="rmsprop"), "optimizer"),
    (EvolutionStrategy, dict(batch_size=0), "batch_size"),
    (GeneticAlgorithm, dict(elite=50), "elite"),
    (GeneticAlgorithm, dict(parents=0), "parents"),
    (GeneticAlgorithm, dict(generations=0), "generations"),
    (DFO, dict(sigma=-0.1), "sigma"),
])
def test_bad_arguments_are_named(cls, kw, msg):
    with pytest.raises(ValueError, match=msg):
        cls(mini_net(), **kw)


def test_ticket_refuses_step_arguments_and_other_errors(mnist):
    x, y = mnist
    with pytest.raises(TypeError, match=r"\['weight_decay'\]"):
        TicketFinder(mini_net(), weight_decay=0.1)
    with pytest.raises(TypeError, match="params must be"):
        EvolutionStrategy(mini_net(), params=3)
    with pytest.raises(ValueError, match="larger than the training set"):
        list(EvolutionStrategy(mini_net(), batch_size=500).run(x, y))
    with pytest.raises(TypeError, match="sweeper="):
        SimulatedAnnealing(mini_net()).sweep_unit(0, x, y, sweeper=object())


def test_dfo_unknown_optimizer(mnist):
    pytest.importorskip("nevergrad")
    x, y = mnist
    with pytest.raises(ValueError, match="optimizer='Adamish'"):
        list(DFO(mini_net(), optimizer="Adamish", batch_size=50).run(x, y))


# -- the CLI ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return mnist_root(tmp_path_factory.mktemp("mnist"), 250, 100)


@pytest.mark.parametrize("method,extra", [
    ("ticket", ["--sparsity", "0.4"]),
    ("es", ["--generations", "4", "--population", "6", "--lr", "0.02"]),
])
def test_cli_method_trains_and_resumes(method, extra, tiny_root, tmp_path, monkeypatch):
    monkeypatch.setitem(models.MODELS, "mini", lambda generator=None: mini_net(width=2))
    args = ["train", "--data-root", str(tiny_root), "--batch-size", "25", "--val-size", "50",
            "--calib-size", "60", "--cycles", "2", "--no-progress", "--seed", "3",
            "--model", "mini", "--method", method, *extra]
    full = tmp_path / "full"
    assert cli.main(args + ["--out", str(full)]) == 0
    result = json.loads((full / cli.RESULT).read_text())
    assert result["method"] == method and 0.0 <= result["test_acc"] <= 1.0
    cfg = json.loads((full / cli.CONFIG).read_text())
    assert cfg["method"] == method

    # stop after the first checkpoint of the second cycle, then resume
    part = tmp_path / "part"
    real_save = cli.checkpoint.save
    calls = {"n": 0}
    stop_at = 3 if method == "ticket" else 5

    def save_then_stop(obj, path):
        real_save(obj, path)
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli.checkpoint, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        cli.main(args + ["--out", str(part)])
    monkeypatch.setattr(cli.checkpoint, "save", real_save)
    assert cli.main(["train", "--resume", str(part), "--no-progress"]) == 0
    a = cli.checkpoint.load(full / cli.CKPT)["rso"]["model"]
    b = cli.checkpoint.load(part / cli.CKPT)["rso"]["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_cli_refuses_an_option_the_method_does_not_take(tiny_root, tmp_path, capsys):
    base = ["train", "--data-root", str(tiny_root), "--no-progress"]
    for method, extra, named in [("es", ["--sample-scale", "2"], "--sample-scale"),
                                 ("sa", ["--candidate-steps", "1,2"], "--candidate-steps"),
                                 ("rso", ["--population", "8"], "--population")]:
        out = tmp_path / method
        with pytest.raises(SystemExit, match=f"{named} is not an option of --method {method}"):
            cli.main(base + ["--method", method, "--out", str(out), *extra])
        assert not out.exists()              # refused before any file is made
    with pytest.raises(TypeError, match="candidate_steps is RSO's option"):
        SimulatedAnnealing(mini_net(width=2), candidate_steps=(1.0, 2.0))


# -- backends --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kw", [(SimulatedAnnealing, {}), (TicketFinder, dict(sparsity=0.5))],
                         ids=["sa", "ticket"])
def test_per_weight_methods_decide_alike_on_the_fused_backend(cls, kw, mnist):
    from rso_ext.rso import BACKENDS
    if "fused" not in BACKENDS:
        pytest.skip("no fused backend in this build")
    x, y = mnist[0][:200], mnist[1][:200]
    nets = []
    for backend in ("torch", "fused"):
        net = mini_net(width=2)
        search = cls(net, cycles=1, batch_size=50, backend=backend, generator=_g(1), **kw)
        list(search.run(x, y))
        assert search.backend == backend
        nets.append(net)
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
