"""The RSO recipe, rule by rule, and an independent re-implementation of Algorithm 1 that the
driver must match decision for decision."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rso_ext import RSO, schedule
from rso_ext.batchnorm import calibrate, search_mode
from rso_ext.evaluate import CachedInput, FullForward
from rso_ext.sweep import NonFiniteLossError, choose
from rso_ext.streams import SweepStreams
from rso_ext.visit import execution_order, visit_units

from helpers import TinyDag, tiny_net, toy_data


# -- sigma and annealing --------------------------------------------------------------------------
def test_sigma_he_and_bn():
    net = tiny_net()
    assert schedule.base_sigma(net.conv2, "weight", net.conv2.weight) == pytest.approx(
        math.sqrt(2 / 27))
    assert schedule.base_sigma(net.fc, "weight", net.fc.weight, sample_scale=0.5) == pytest.approx(
        0.5 * math.sqrt(2 / 4))
    assert schedule.base_sigma(net.bn1, "weight", net.bn1.weight) == 0.167
    emp = schedule.base_sigma(net.conv2, "weight", net.conv2.weight, mode="empirical")
    assert emp == pytest.approx(float(net.conv2.weight.double().std()))
    with pytest.raises(ValueError, match="sigma must be one of"):
        schedule.base_sigma(net.fc, "weight", net.fc.weight, mode="adam")


def test_annealing_is_linear_to_alpha():
    C, a = 10, 0.1
    vals = [schedule.annealed(2.0, c, C, a) for c in range(C)]
    assert vals[0] == pytest.approx(2.0)
    assert vals[-1] == pytest.approx(2.0 * (a + (1 - a) / C))
    steps = [vals[i] - vals[i + 1] for i in range(C - 1)]
    assert all(s == pytest.approx(2.0 * (1 - a) / C) for s in steps)
    with pytest.raises(ValueError, match="cycle must be in"):
        schedule.annealed(1.0, C, C, a)


# -- choice rule ----------------------------------------------------------------------------------
def test_ties_keep_the_current_weight_and_nan_is_never_chosen():
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    assert choose(t(1.0, 1.0, 1.0)) == 0
    assert choose(t(2.0, 1.0, 1.0)) == 1
    assert choose(t(2.0, 3.0, 1.0)) == 2
    assert choose(t(1.0, float("nan"), 0.5)) == 2
    assert choose(t(1.0, float("-inf"), float("nan"))) == 0
    assert choose(t(1.0, float("nan"), float("nan"))) == 0


def test_weight_decay_applies_at_every_visit_whatever_the_outcome():
    # sigma = 0: every candidate equals w' = w (1 - wd), so the tie rule keeps w'.
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = toy_data()
    rso = RSO(net, cycles=1, batch_size=20, sample_scale=0.0, bn_sigma=0.0, weight_decay=0.01)
    stats = list(rso.run(x, y))
    assert all(s.accepted == 0 for s in stats)
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.data, before[name] * (1 - 0.01), rtol=0, atol=0)


# -- sampler --------------------------------------------------------------------------------------
def test_shuffle_sampler_chunks_one_permutation():
    g = torch.Generator().manual_seed(3)
    s = SweepStreams.draw(g, n=10, sigma=1.0, pool_size=23, batch_size=5, sampler="shuffle")
    chunks = [s.batch(k) for k in range(4)]
    assert torch.equal(torch.cat(chunks), s.perm[:20])
    assert torch.equal(s.batch(4), s.batch(0))           # k mod floor(23/5) = 4 chunks
    assert len(set(torch.cat(chunks).tolist())) == 20
    for start, stop in [(0, 4), (3, 11), (7, 8)]:     # batches() is batch() row by row
        assert torch.equal(s.batches(start, stop),
                           torch.stack([s.batch(k) for k in range(start, stop)]))


def test_random_sampler_is_reproducible_and_in_range():
    draw = lambda: SweepStreams.draw(torch.Generator().manual_seed(5), 4, 1.0, 50, 30, "random")  # noqa: E731
    a, b = draw(), draw()
    assert torch.equal(a.batches(0, 4), b.batches(0, 4))
    assert torch.equal(a.deltas, b.deltas)
    idx = a.batches(0, 4)
    assert idx.min() >= 0 and idx.max() < 50
    assert len(set(idx[0].tolist())) < 30                  # with replacement: 30 of 50 repeat


def test_streams_draw_deltas_then_batches():
    g = torch.Generator().manual_seed(11)
    s = SweepStreams.draw(g, n=7, sigma=0.5, pool_size=40, batch_size=8)
    g2 = torch.Generator().manual_seed(11)
    torch.testing.assert_close(s.deltas, torch.randn(7, generator=g2) * 0.5)
    assert torch.equal(s.perm, torch.randperm(40, generator=g2))


# -- order ----------------------------------------------------------------------------------------
def test_visit_order_reverse_layers_bn_after_its_conv():
    net = tiny_net(bias=True)
    units = visit_units(net, torch.zeros(2, 1, 8, 8))
    assert [u.name for u in units] == [
        "fc.weight", "fc.bias", "conv2.weight", "conv2.bias", "bn2.bias", "bn2.weight",
        "conv1.weight", "conv1.bias", "bn1.bias", "bn1.weight"]


def test_paper_mnist_order_matches_design():
    from rso_ext.models import paper_mnist
    names = [u.name for u in visit_units(paper_mnist(), torch.zeros(2, 1, 28, 28))]
    expect = ["fc.weight"]
    for i in range(6, 0, -1):
        expect += [f"conv{i}.weight", f"bn{i}.bias", f"bn{i}.weight"]
    assert names == expect


def test_weights_are_visited_out_in_ky_kx(monkeypatch):
    net = tiny_net()
    seen: list[tuple[str, int]] = []
    orig = FullForward.losses

    def spy(self, k, values, idx, target):
        seen.append((self.unit.name, k))
        return orig(self, k, values, idx, target)

    monkeypatch.setattr(FullForward, "losses", spy)
    x, y = toy_data(40)
    list(RSO(net, cycles=1, batch_size=10, backend="torch").run(x, y))
    conv2 = [k for n, k in seen if n == "conv2.weight"]
    assert conv2 == list(range(net.conv2.weight.numel()))   # row-major = out, in, ky, kx
    assert [n for n, _ in seen][:12] == ["fc.weight"] * 12


# -- BatchNorm ------------------------------------------------------------------------------------
def test_calibration_gives_exact_statistics_of_the_calibration_set():
    net = tiny_net()
    x, _ = toy_data(64)
    calibrate(net, x)
    assert not net.training
    z = net.conv1(x)
    torch.testing.assert_close(net.bn1.running_mean, z.mean((0, 2, 3)))
    torch.testing.assert_close(net.bn1.running_var, z.var((0, 2, 3), unbiased=True))


def test_search_mode_batch_stats_from_the_swept_layer_on():
    net = tiny_net()
    order = [m for _, m in execution_order(net, torch.zeros(2, 1, 8, 8))]
    pos = order.index(net.conv2)
    net.train()
    with search_mode(net, order, pos):
        assert not net.bn1.training                       # upstream: calibrated statistics
        assert net.bn2.training and not net.bn2.track_running_stats
    assert net.bn1.training and net.bn2.track_running_stats    # restored


@pytest.mark.parametrize("unit_index", range(7))
def test_cached_input_equals_full_forward(unit_index):
    net = tiny_net(seed=4)
    x, y = toy_data(60)
    calibrate(net, x[:30])
    units = visit_units(net, x[:2])
    order = [m for _, m in execution_order(net, x[:2])]
    unit = units[unit_index]
    idx = torch.arange(5, 25)
    vals = unit.param.data.view(-1)[1] + torch.tensor([0.0, 0.3, -0.3])
    out = []
    for ev in (CachedInput(net), FullForward(net)):
        with search_mode(net, order, unit.position):
            ev.begin(unit, x)
            out.append(ev.losses(1, vals, idx, y[idx]))
    torch.testing.assert_close(out[0], out[1], rtol=1e-6, atol=1e-9)


# -- an independent re-implementation of the recipe ------------------------------------------------
def _oracle(net: nn.Sequential, x, y, cycles, B, alpha, wd, seed, steps=(1.0,), B0=None):
    """Algorithm 1 written out for tiny_net with functional ops only (with the variants:
    candidates w' +- s * delta for s in ``steps``; cycle c's minibatch min(B, B0 * 2**c))."""
    P = {k: v.detach().clone() for k, v in net.named_parameters()}
    g = torch.Generator().manual_seed(seed)
    calib = torch.randperm(len(x), generator=g)[:2000]

    def fwd(P, xb, fixed):
        """fixed: dict bn-name -> (mean, var) for upstream BNs; others batch statistics."""
        stats = {}

        def bn(name, z):
            if name in fixed:
                m, v = fixed[name]
                return F.batch_norm(z, m, v, P[name + ".weight"], P[name + ".bias"], False, 0.0, 1e-5)
            stats[name] = (z.mean((0, 2, 3)), z.var((0, 2, 3), unbiased=True))
            return F.batch_norm(z, None, None, P[name + ".weight"], P[name + ".bias"], True, 0.0, 1e-5)

        h = bn("bn1", F.conv2d(xb, P["conv1.weight"], padding=1))
        h = F.avg_pool2d(F.relu(h), 2)
        h = bn("bn2", F.conv2d(h, P["conv2.weight"], padding=1))
        return F.linear(h.mean((2, 3)), P["fc.weight"]), stats

    order = [("fc.weight", None), ("conv2.weight", "bn2"), ("bn2.bias", "bn2"),
             ("bn2.weight", "bn2"), ("conv1.weight", "bn1"), ("bn1.bias", "bn1"),
             ("bn1.weight", "bn1")]
    upstream = {"fc.weight": ["bn1", "bn2"], "conv2.weight": ["bn1"], "bn2.bias": ["bn1"],
                "bn2.weight": ["bn1"], "conv1.weight": [], "bn1.bias": [], "bn1.weight": []}
    sig0 = {"fc.weight": math.sqrt(2 / 4), "conv2.weight": math.sqrt(2 / 27),
            "conv1.weight": math.sqrt(2 / 9)}
    decisions = []
    for c in range(cycles):
        Bc = B if B0 is None else min(B, B0 * 2 ** c)
        for name, _ in order:
            s = sig0.get(name, 0.167) * (alpha + (1 - alpha) * (cycles - c) / cycles)
            n = P[name].numel()
            deltas = torch.randn(n, generator=g) * s
            perm = torch.randperm(len(x), generator=g)
            _, cal = fwd(P, x[calib], {})
            fixed = {b: cal[b] for b in upstream[name]}
            flat = P[name].view(-1)
            for k in range(n):
                ch = k % (len(x) // Bc)
                idx = perm[ch * Bc:(ch + 1) * Bc]
                w = flat[k] * (1 - wd)
                cands = [w]
                for m in steps:
                    cands += [w + deltas[k] * m, w - deltas[k] * m]
                losses = []
                for v in cands:
                    flat[k] = v
                    logits, _ = fwd(P, x[idx], fixed)
                    losses.append(float(F.cross_entropy(logits.double(), y[idx], reduction="sum")))
                K = len(cands)
                j = min(range(K), key=lambda i: (losses[i], i))
                flat[k] = cands[j]
                decisions.append((j, min(abs(losses[a] - losses[b]) for a in range(K)
                                         for b in range(a + 1, K))))
    return P, decisions


@pytest.mark.parametrize("backend", ["torch", "fused"])
def test_driver_matches_independent_implementation(backend):
    torch.manual_seed(0)
    net = tiny_net(seed=7)
    x, y = toy_data(90, seed=2)
    P, decisions = _oracle(net, x, y, cycles=2, B=30, alpha=0.1, wd=1e-3, seed=5)
    # the comparison is meaningful only where the loss margins are clear of float noise
    margins = sorted(m for _, m in decisions)
    assert sum(j != 0 for j, _ in decisions) > 10
    rso = RSO(net, cycles=2, batch_size=30, alpha=0.1, weight_decay=1e-3,
              generator=torch.Generator().manual_seed(5), backend=backend)
    list(rso.run(x, y))
    assert rso.backend == backend
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.data, P[name], rtol=1e-5, atol=1e-6, msg=name)
    assert margins[len(margins) // 10] > 1e-6


@pytest.mark.parametrize("backend", ["torch", "fused"])
def test_variants_match_independent_implementation(backend):
    """candidate_steps=(1, 2) (five candidates) and batch_start (a doubling minibatch) against
    the oracle written out with them."""
    net = tiny_net(seed=7)
    x, y = toy_data(90, seed=2)
    P, decisions = _oracle(net, x, y, cycles=3, B=40, alpha=0.1, wd=1e-3, seed=5,
                           steps=(1.0, 2.0), B0=10)
    assert {j for j, _ in decisions} >= {0, 1, 2, 3, 4}     # the 2-delta candidates win too
    rso = RSO(net, cycles=3, batch_size=40, alpha=0.1, weight_decay=1e-3,
              generator=torch.Generator().manual_seed(5), backend=backend,
              candidate_steps=(1.0, 2.0), batch_start=10)
    assert [rso.batch_size(c) for c in range(4)] == [10, 20, 40, 40]
    stats = list(rso.run(x, y))
    assert rso.backend == backend and rso.candidates == 5
    n = sum(p.numel() for p in net.parameters())
    assert stats[-1].evaluations == n * 5 * (10 + 20 + 40)
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.data, P[name], rtol=1e-5, atol=1e-6, msg=name)
    margins = sorted(m for _, m in decisions)
    assert margins[len(margins) // 10] > 1e-6


def test_variant_options_are_checked_and_kept_by_checkpoints():
    for bad, match in [(dict(candidate_steps=(0.0,)), "finite positive"),
                       (dict(candidate_steps=(1.0, float("nan"))), "finite positive"),
                       (dict(candidate_steps=(1.0, 1.0)), "each once"),
                       (dict(candidate_steps=()), "at least one"),
                       (dict(candidate_steps="12"), "sequence of numbers"),
                       (dict(batch_start=0), r"batch_start must be in \[1, 20\]"),
                       (dict(batch_start=21), r"batch_start must be in \[1, 20\]")]:
        with pytest.raises((ValueError, TypeError), match=match):
            RSO(tiny_net(), batch_size=20, **bad)
    plain = RSO(tiny_net(), cycles=2, batch_size=20)
    assert "candidate_steps" not in plain.hparams and "batch_start" not in plain.hparams
    variant = RSO(tiny_net(), cycles=2, batch_size=20, candidate_steps=[1, 2], batch_start=5)
    assert variant.hparams["candidate_steps"] == (1.0, 2.0)
    with pytest.raises(ValueError, match="candidate_steps: saved None vs \\(1.0, 2.0\\)"):
        variant.load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match="batch_start: saved 5 vs None"):
        plain.load_state_dict(variant.state_dict())


def test_full_forward_path_for_non_sequential_models_learns():
    net = TinyDag(seed=1)
    x, y = toy_data(150)
    rso = RSO(net, cycles=2, batch_size=50, generator=torch.Generator().manual_seed(0))
    stats = list(rso.run(x, y))
    first = [s.mean_loss for s in stats if s.cycle == 0][0]
    last = [s.mean_loss for s in stats if s.cycle == 1][-1]
    assert last < first
    assert sum(s.accepted for s in stats) > 0


# -- determinism, resume -----------------------------------------------------------------------
def _trained(seed=0, stop_after=None, resume_from=None):
    net = tiny_net(seed=3)
    x, y = toy_data(80)
    rso = RSO(net, cycles=2, batch_size=20, sampler="random",
              generator=torch.Generator().manual_seed(seed))
    if resume_from is not None:
        rso.load_state_dict(resume_from)
    for i, _ in enumerate(rso.run(x, y)):
        if stop_after is not None and i + 1 == stop_after:
            return net, rso.state_dict()
    return net, rso.state_dict()


def test_same_seed_same_weights_other_seed_other_weights():
    a, _ = _trained(0)
    b, _ = _trained(0)
    c, _ = _trained(1)
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), n
    assert any(not torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters()))


def test_resume_from_state_dict_equals_uninterrupted_run():
    full, state_full = _trained(0)
    _, mid = _trained(0, stop_after=9)          # stops inside the second cycle
    assert (mid["cycle"], mid["unit"]) == (1, 2)
    resumed, state_res = _trained(0, resume_from=mid)
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(state_full["generator"], state_res["generator"])


def test_load_state_dict_refuses_other_hyperparameters():
    _, state = _trained(0, stop_after=1)
    rso = RSO(tiny_net(), cycles=3, batch_size=20)
    with pytest.raises(ValueError, match="cycles: saved 2 vs 3"):
        rso.load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        rso.load_state_dict({"model": {}})


# -- bad input ------------------------------------------------------------------------------------
def test_unsupported_module_is_named():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LayerNorm(72), nn.Linear(72, 3))
    x, y = toy_data(20)
    with pytest.raises(TypeError, match=r"'2' \(LayerNorm\)"):
        list(RSO(net, batch_size=5).run(x, y))


def test_bad_data_and_arguments():
    x, y = toy_data(20)
    with pytest.raises(ValueError, match="larger than the training set"):
        list(RSO(tiny_net(), batch_size=21).run(x, y))
    bad = x.clone()
    bad[3, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        list(RSO(tiny_net(), batch_size=5).run(bad, y))
    with pytest.raises(ValueError, match="label"):
        list(RSO(tiny_net(), batch_size=5).run(x, y + 10))
    for kw, msg in [(dict(cycles=0), "cycles"), (dict(batch_size=0), "batch_size"),
                    (dict(alpha=2.0), "alpha"), (dict(weight_decay=1.0), "weight_decay"),
                    (dict(sampler="any"), "sampler"), (dict(backend="jax"), "backend")]:
        with pytest.raises(ValueError, match=msg):
            RSO(tiny_net(), **kw)


def test_non_finite_current_loss_names_layer_and_weight():
    net = tiny_net()
    with torch.no_grad():
        net.fc.weight[0, 0] = float("inf")
    x, y = toy_data(20)
    with pytest.raises(NonFiniteLossError, match=r"cycle 0: .* layer 'fc.weight', weight 0 \(index \(0, 0\)\)"):
        list(RSO(net, batch_size=5).run(x, y))


def test_sweep_unit_visits_a_prefix_without_moving_the_position():
    net = tiny_net()
    x, y = toy_data(40)
    rso = RSO(net, cycles=2, batch_size=10)
    before = net.conv2.weight.detach().clone().view(-1)
    stats = rso.sweep_unit(1, x, y, weights=5)
    after = net.conv2.weight.detach().view(-1)
    assert stats.layer == "conv2.weight" and stats.weights == 5
    assert torch.equal(before[5:], after[5:]) and not torch.equal(before[:5], after[:5])
    assert (rso.cycle, rso.unit) == (0, 0)
    with pytest.raises(IndexError, match="unit index 99"):
        rso.sweep_unit(99, x, y)
