"""The one contract of the search methods (rso_ext.contract): every registered class satisfies it,
yields the one Stats type, reads its command-line options from the registry, takes a pluggable
loss, and the population methods' ask/tell is what step() runs."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from rso_ext import RSO, cli, losses, optim
from rso_ext.contract import (METHODS, Method, Stats, constructor_arguments, from_config,
                              method_help, takers)
from rso_ext.methods import PopulationMethod
from rso_ext.methods.base import draw_batch

from test_methods import mini_net

# what metrics.jsonl rows held before the one Stats type (tests and users read them)
SWEEP_FIELDS = {"cycle", "unit", "layer", "weights", "accepted", "mean_loss", "sigma", "seconds",
                "cycle_done"}
GENERATION_FIELDS = {"cycle", "generation", "evaluations", "mean_loss", "best_loss", "sigma",
                     "seconds", "cycle_done"}
COMMON = {"method", "cycle", "step", "layer", "evaluations", "mean_loss", "sigma", "seconds",
          "cycle_done"}

# small settings per method: a few steps on mini_net
SMALL = {
    "rso": dict(cycles=2, batch_size=20),
    "sa": dict(cycles=2, batch_size=20),
    "ticket": dict(cycles=2, batch_size=20),
    "es": dict(cycles=2, generations=2, batch_size=20, population=4),
    "ga": dict(cycles=2, generations=2, batch_size=20, population=4),
    "dfo": dict(cycles=2, generations=2, batch_size=20, population=4, optimizer="DiagonalCMA"),
}


@pytest.fixture(scope="module")
def data():
    from rso_ext import data as d
    s = d.load_splits(val_size=0)
    return s.train_x[:120], s.train_y[:120]


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _build(name, seed=0, net_seed=0, **kw):
    if name == "dfo":
        pytest.importorskip("nevergrad")
    return METHODS[name](mini_net(seed=net_seed, width=2), generator=_g(seed),
                         **dict(SMALL[name], **kw))


def _weights(search):
    return [p.detach().clone() for p in search.model.parameters()]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b))


# -- the registry -------------------------------------------------------------------------------
def test_registry_lists_every_method_in_order():
    assert list(METHODS) == ["rso", "sa", "ticket", "es", "ga", "dfo"]
    assert METHODS["rso"] is RSO


@pytest.mark.parametrize("name", list(METHODS))
def test_registered_class_declares_its_entry(name):
    cls = METHODS[name]
    assert issubclass(cls, Method) and cls.method == name
    assert cls.summary and "\n" not in cls.summary
    assert cls.kind == ("population" if issubclass(cls, PopulationMethod) else "per-weight")
    # every option maps to a constructor argument, every option is a train option of the CLI
    args = constructor_arguments(cls)
    assert set(cls.cli_options.values()) <= args, name
    assert set(cls.cli_options) <= set(cli.DEFAULTS), name
    assert "loss" in args and "generator" in args


@pytest.mark.parametrize("name", list(METHODS))
def test_from_config_passes_the_declared_options(name):
    if name == "dfo":
        pytest.importorskip("nevergrad")
    cfg = dict(cli.DEFAULTS, method=name, cycles=3, batch_size=7, calib_size=11, generations=5,
               population=6, noise=0.03, lr=0.02, temperature=2e-3, sparsity=0.25)
    search = from_config(cfg, mini_net(width=2), _g())
    assert type(search) is METHODS[name]
    for opt, arg in type(search).cli_options.items():
        if cfg[opt] is not None and arg in search.hparams:
            assert search.hparams[arg] == cfg[opt], (name, opt)
    with pytest.raises(ValueError, match="method must be one of"):
        from_config(dict(cfg, method="adam"), mini_net(), _g())


def test_cli_help_is_derived_from_the_registry(capsys):
    assert takers("lr") == "es" and takers("generations") == "es/ga/dfo"
    assert takers("temperature") == "sa" and takers("sparsity") == "ticket"
    text = method_help()
    for name, cls in METHODS.items():
        assert f"{name}: {cls.summary}" in text or f"{name} (default): {cls.summary}" in text
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "es/ga/dfo: generations per cycle" in out and "sa: first temperature" in out
    assert " ".join(f"rso (default): {METHODS['rso'].summary}".split()) in out


def test_optimizer_forms_name_their_method():
    pairs = {optim.RandomSearch: "rso", optim.SimulatedAnnealing: "sa",
             optim.TicketFinder: "ticket", optim.EvolutionStrategy: "es",
             optim.GeneticAlgorithm: "ga"}
    for cls, name in pairs.items():
        assert cls.method == name and name in METHODS
    assert optim.RSO is optim.RandomSearch


# -- the contract ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_satisfies_the_contract(name, data):
    x, y = data
    search = _build(name)
    assert isinstance(search, Method)
    for attr in ("model", "hparams", "generator", "backend_reason", "cycle", "unit", "done"):
        assert hasattr(search, attr), (name, attr)

    before = (_weights(search), search.generator.get_state().clone())
    search.check(x, y)                                   # refuses nothing, changes nothing
    assert _same(before[0], _weights(search))
    assert torch.equal(before[1], search.generator.get_state())

    s0 = search.step(x, y)
    assert type(s0) is Stats and s0.method == name and s0.step == 0 and s0.cycle == 0
    assert s0.evaluations > 0 and s0.seconds >= 0
    row = s0.as_dict()
    assert COMMON <= set(row), name
    old = SWEEP_FIELDS if search.kind == "per-weight" else GENERATION_FIELDS
    assert old <= set(row), (name, old - set(row))
    assert all(v is not None for v in row.values())

    s1 = search.step()                                   # the same data again
    assert s1.step == 1 and s1.evaluations > s0.evaluations
    state = copy.deepcopy(search.state_dict())

    rest = list(search.run(x, y))
    assert search.done and rest[-1].cycle_done and rest[-1].cycle == 1
    assert [s.step for s in rest] == list(range(2, 2 + len(rest)))
    with pytest.raises(RuntimeError, match="done"):
        search.step()

    again = _build(name, seed=5, net_seed=9)             # all must come from the state
    again.load_state_dict(state)
    assert [s.as_dict().keys() for s in again.run(x, y)] == [s.as_dict().keys() for s in rest]
    assert _same(_weights(search), _weights(again))
    assert torch.equal(search.generator.get_state(), again.generator.get_state())
    assert again.calibrate(x) is again.model


@pytest.mark.parametrize("name", list(METHODS))
def test_step_makes_the_decisions_of_run(name, data):
    x, y = data
    a, b = _build(name, seed=3), _build(name, seed=3)
    by_run = [s.as_dict() for s in a.run(x, y)]
    by_step = []
    while not b.done:
        by_step.append(b.step(x, y).as_dict())
    for r, s in zip(by_run, by_step):
        r.pop("seconds"), s.pop("seconds")
    assert by_run == by_step
    assert _same(_weights(a), _weights(b))


@pytest.mark.parametrize("backend", ["torch", "fused"])
@pytest.mark.parametrize("name", ["rso", "sa", "ticket"])
def test_run_stop_ends_a_sweep_inside_its_unit_and_going_on_sweeps_it_again(name, backend, data):
    from rso_ext.rso import BACKENDS
    if backend not in BACKENDS:
        pytest.skip(f"no {backend} backend in this build")
    x, y = data

    def build():      # fc: 1,440 weights; polled every 64 (torch loops) or 432 (fused calls)
        return METHODS[name](mini_net(width=16), generator=_g(4), backend=backend, **SMALL[name])
    whole, part = build(), build()
    before = _weights(part)
    on, polls = [True], []

    def stop():
        polls.append(1)
        return on[0] and len(polls) >= 2                  # the second poll stops the sweep
    it = part.run(x, y, stop=stop)
    s = next(it)
    unit = part.units[0]
    i = [q is unit.param for q in part.model.parameters()].index(True)
    n, k = unit.param.numel(), s.weights
    assert unit.name == "fc.weight" and 0 < k < n and len(polls) == 2
    assert not s.cycle_done and (part.cycle, part.unit) == (0, 0) and s.unit == 0
    done = whole.step(x, y)                               # the same streams, swept to the end
    assert done.weights == n and (whole.cycle, whole.unit) == (0, 1)
    got, ref, init = (t.detach().reshape(-1) for t in (unit.param, whole.units[0].param,
                                                       before[i]))
    assert torch.equal(got[k:], init[k:])                 # the rest untouched (the ticket
    if name != "ticket":                                  # does not prune a stopped sweep)
        assert torch.equal(got[:k], ref[:k])              # the visited ones as the whole sweep
    assert not torch.equal(got, init)
    for j, (a, b) in enumerate(zip(_weights(part), before)):
        if j != i:
            assert torch.equal(a, b)                      # no other unit moved
    on[0] = False
    again = next(it)                                      # the same unit, from its first weight
    assert again.unit == 0 and again.weights == n and (part.cycle, part.unit) == (0, 1)


def test_run_stop_must_be_callable(data):
    with pytest.raises(TypeError, match="stop must be a callable"):
        next(_build("rso").run(*data, stop=5))


def test_step_needs_data_the_first_time():
    with pytest.raises(ValueError, match="needs training data"):
        _build("rso").step()


# -- ask / tell -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["es", "ga", "dfo"])
def test_step_is_ask_evaluate_tell(name, data):
    x, y = data
    a, b = _build(name, seed=2), _build(name, seed=2)
    a.step(x, y)
    a.step()

    b.check(x, y)                     # data seen (DFO's params="bn+last" needs the layer order)
    b.start()                         # what the first step does before drawing its minibatch
    for _ in range(2):                                   # the same by hand on b
        idx = draw_batch(b.generator, len(x), b.hparams["batch_size"])
        thetas = b.ask()
        assert thetas.shape == (b.hparams["population"], b.theta().numel())
        assert thetas.dtype == b.param_dtype
        b.tell(b.evaluate(thetas, x[idx], y[idx]))
    assert b.generation == 2 and b.evaluations == a.evaluations
    assert _same(_weights(a), _weights(b))
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


def test_tell_checks_what_it_is_told():
    es = _build("es")
    with pytest.raises(RuntimeError, match="without ask"):
        es.tell(torch.zeros(4, dtype=torch.float64))
    es.ask()
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        es.tell(torch.zeros(3))
    es.tell([1.0, 2.0, 3.0, 4.0])                        # any sequence of P numbers
    assert es.generation == 1


def test_ask_tell_without_data_on_a_quadratic():
    """ask/tell as in evosax/EvoTorch, the losses computed by the caller, no training data."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 2, bias=False))
    es = METHODS["es"](net, cycles=1, generations=80, batch_size=1, population=20, sigma=0.1,
                       lr=0.05, generator=_g())
    target = torch.full((8,), 0.5)
    start = float(((es.theta() - target) ** 2).sum())
    while not es.done:
        thetas = es.ask()
        es.tell(((thetas - target) ** 2).sum(1).double())
    assert float(((es.theta() - target) ** 2).sum()) < 0.2 * start
    assert es.generation == 80 and es.evaluations == 80 * 20
    with pytest.raises(RuntimeError, match="done"):
        es.ask()


@pytest.mark.parametrize("name", ["es", "ga"])
def test_optimizer_forms_wrap_the_same_strategies(name, data, monkeypatch):
    """optim.EvolutionStrategy/GeneticAlgorithm step through the class forms' ask/tell code."""
    from rso_ext.methods.es import ESStrategy
    from rso_ext.methods.ga import GAStrategy
    strategy = {"es": ESStrategy, "ga": GAStrategy}[name]
    told = {"n": 0}
    real = strategy.tell

    def tell(self, losses):
        told["n"] += 1
        return real(self, losses)
    monkeypatch.setattr(strategy, "tell", tell)
    x, y = data
    net = mini_net(width=2)
    cls = {"es": optim.EvolutionStrategy, "ga": optim.GeneticAlgorithm}[name]
    opt = cls(net.parameters(), population=4, sigma=0.05, pool_size=len(x), batch_size=20,
              generator=_g())
    opt.step(lambda idx: F.cross_entropy(net(x[idx]).double(), y[idx], reduction="sum"))
    search = _build(name)
    search.step(x, y)
    assert told["n"] == 2


# -- the loss -------------------------------------------------------------------------------------
def _counting():
    calls = {"n": 0}

    def counted(logits, target):
        calls["n"] += 1
        return losses.cross_entropy(logits, target)
    return counted, calls


@pytest.mark.parametrize("name", ["rso", "sa", "ticket", "es", "ga"])
def test_a_given_loss_is_the_one_minimised(name, data):
    """The same cross-entropy through a callable that is not the default: every candidate goes
    through it, and the decisions are those of the default loss on the torch backend."""
    x, y = data
    counted, calls = _counting()
    backend = {} if name in ("es", "ga") else dict(backend="torch")
    ref = _build(name, **backend)
    mine = _build(name, loss=counted)
    a = [s.as_dict() for s in ref.run(x, y)]
    b = [s.as_dict() for s in mine.run(x, y)]
    assert calls["n"] > 0
    for r in a + b:
        r.pop("seconds")
    assert a == b
    assert _same(_weights(ref), _weights(mine))
    if name not in ("es", "ga"):
        assert mine.backend == "torch"
        assert "loss" in mine.backend_reason and "torch" in mine.backend_reason


def test_another_loss_keeps_per_weight_methods_on_torch_and_refuses_fused(data):
    x, y = data
    margin = losses.summed(lambda z, t: F.multi_margin_loss(z, t, reduction="none"),
                           name="multi_margin")
    with pytest.raises(ValueError, match="fused.*cross-entropy"):
        RSO(mini_net(), backend="fused", loss=margin)
    with pytest.raises(TypeError, match="loss must be a callable"):
        RSO(mini_net(), loss="mse")
    rso = RSO(mini_net(width=2), cycles=1, batch_size=20, loss=margin, generator=_g())
    stats = list(rso.run(x, y))
    assert rso.backend == "torch" and "multi_margin" in rso.backend_reason
    assert all(torch.isfinite(torch.tensor(s.mean_loss)) for s in stats)
    assert rso.hparams["loss"].endswith("multi_margin")
    with pytest.raises(ValueError, match="loss"):
        RSO(mini_net(width=2), cycles=1, batch_size=20).load_state_dict(rso.state_dict())


def test_summed_matches_the_compiled_cross_entropy():
    g = _g(1)
    logits = torch.randn(3, 5, 4, generator=g)
    target = torch.randint(0, 4, (5,), generator=g)
    ce = losses.summed(lambda z, t: F.cross_entropy(z, t, reduction="none"))
    torch.testing.assert_close(ce(logits, target), losses.cross_entropy(logits, target))
    assert losses.is_cross_entropy(None) and losses.is_cross_entropy(losses.cross_entropy)
    assert not losses.is_cross_entropy(ce)
