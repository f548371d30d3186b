"""The memory check before a unit sweep (rso_ext.memory): estimate, available figure, refusal."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
from torch import nn

from rso_ext import RSO, cli, memory, models
from rso_ext.evaluate import CachedInput, FullForward
from rso_ext.sweep import TorchSweeper
from rso_ext.visit import visit_units

from helpers import TinyDag, mnist_root, tiny_net, toy_data

pytestmark = pytest.mark.usefixtures("one_thread")


def test_estimate_is_pool_times_cache_plus_batch_times_work():
    assert memory.estimate_sweep_bytes(1000, 50, 96, 400, fixed_bytes=7) == 96_000 + 20_000 + 7
    with pytest.raises(ValueError, match="batch_size must be >= 0"):
        memory.estimate_sweep_bytes(10, -1, 1, 1)


def test_byte_figures_read_and_print():
    assert memory.parse_bytes("123") == 123
    assert memory.parse_bytes("1.5G") == 3 << 29
    assert memory.parse_bytes("512MiB") == 512 << 20
    assert memory.parse_bytes("64 kb") == 64 << 10
    with pytest.raises(ValueError, match="byte count"):
        memory.parse_bytes("lots")
    assert memory.format_bytes(512) == "512 B"
    assert memory.format_bytes(3 << 29) == "1.5 GiB"
    assert memory.format_bytes(1 << 62) == "4.19e+06 TiB"


def test_available_memory_of_the_cpu_and_its_cap(monkeypatch):
    monkeypatch.delenv(memory.ENV_LIMIT, raising=False)
    avail = memory.available_bytes("cpu")
    if avail is None:
        pytest.skip("this system does not tell its available memory")
    assert 0 < avail <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    monkeypatch.setenv(memory.ENV_LIMIT, "1M")
    assert memory.available_bytes("cpu") == 1 << 20
    assert memory.available_bytes("meta") == 1 << 20      # unknown device: only the cap


def test_an_impossible_size_is_refused_with_estimate_available_and_fix(monkeypatch):
    monkeypatch.delenv(memory.ENV_LIMIT, raising=False)
    if memory.available_bytes("cpu") is None:
        pytest.skip("this system does not tell its available memory")
    with pytest.raises(memory.InsufficientMemoryError) as err:
        memory.check_fits(1 << 62, "cpu", "the sweep of 'x'", "lower --batch-size")
    msg = str(err.value)
    assert re.search(r"the sweep of 'x' needs about 4\.19e\+06 TiB on cpu but only [0-9.]+ "
                     r"(GiB|MiB|TiB) is available \(available RAM\); lower --batch-size", msg), msg
    assert isinstance(err.value, MemoryError) and err.value.estimate == 1 << 62
    memory.check_fits(1 << 20, "cpu", "a small sweep", "-")        # fits: no error


def test_torch_estimate_covers_the_cache_the_sweep_builds():
    x, _ = toy_data(200)
    net = tiny_net()
    trace = memory.trace_footprint(net, x[:2])
    assert [type(f.module).__name__ for f in trace][:3] == ["Conv2d", "BatchNorm2d", "ReLU"]
    for unit in visit_units(net, x[:2]):
        ev = CachedInput(net)
        total, detail = memory.sweep_estimate(net, unit.module, TorchSweeper(unit, ev), len(x),
                                              20, trace=trace)
        ev.begin(unit, x)
        cache = ev.x.numel() * ev.x.element_size()
        ev.end()
        assert cache <= total and f"for {len(x)} samples" in detail
        assert 2 * cache <= total <= 2 * cache + 20 * 4 * 1024 + 20 * 4 * 8 * 8 * 4 * 3
    dag = TinyDag()
    unit = visit_units(dag, x[:2])[0]
    total, detail = memory.sweep_estimate(dag, unit.module, TorchSweeper(unit, FullForward(dag)),
                                          len(x), 20, sample=x[:2])
    assert "cached" not in detail and 0 < total < 20 * 4 * 3 * 8 * 8 * 8


def test_rso_stops_before_a_sweep_that_would_not_fit():
    x, y = toy_data(120)
    net = tiny_net()
    before = {k: v.clone() for k, v in net.named_parameters()}
    rso = RSO(net, cycles=1, batch_size=20, calib_size=50, backend="torch", memory_limit=1000)
    with pytest.raises(memory.InsufficientMemoryError) as err:
        next(rso.run(x, y))
    msg = str(err.value)
    assert "the sweep of 'fc.weight'" in msg and "is available (memory_limit)" in msg
    assert "--batch-size, now 20" in msg and "--train-size" in msg and "now 120)" in msg
    assert all(torch.equal(before[k], v) for k, v in net.named_parameters())
    with pytest.raises(memory.InsufficientMemoryError):
        RSO(tiny_net(), batch_size=20, backend="torch", memory_limit=1000).check(x, y)
    ok = RSO(tiny_net(), cycles=1, batch_size=20, calib_size=50, backend="torch",
             memory_limit=1 << 30)
    assert len(list(ok.run(x, y))) == 7


def tiny_mnist_net(generator=None):
    net = tiny_net()
    net.fc = nn.Linear(4, 10, bias=False)
    return models.he_init_(net, generator)


def test_cli_refuses_a_run_that_would_not_fit_before_creating_anything(tmp_path, monkeypatch,
                                                                       capsys):
    root = mnist_root(tmp_path / "mnist", 60, 30)
    monkeypatch.setitem(models.MODELS, "tiny", tiny_mnist_net)
    monkeypatch.setenv(memory.ENV_LIMIT, "64K")
    out = tmp_path / "run"
    argv = ["train", "--data-root", str(root), "--out", str(out), "--batch-size", "10",
            "--val-size", "10", "--calib-size", "20", "--no-progress", "--model", "tiny",
            "--backend", "torch", "--cycles", "1"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "out of memory before starting: the sweep of" in err
    assert f"is available ({memory.ENV_LIMIT}=64K)" in err and "--batch-size" in err
    assert not out.exists()
    monkeypatch.delenv(memory.ENV_LIMIT)
    assert cli.main(argv) == 0
    assert json.loads((out / cli.RESULT).read_text())["cycles"] == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_available_memory_of_a_gpu():
    avail = memory.available_bytes("cuda")
    free, total = torch.cuda.mem_get_info()
    assert free <= avail <= total
    with pytest.raises(memory.InsufficientMemoryError, match="free GPU memory"):
        memory.check_fits(total + 1, "cuda", "the sweep", "lower --pool-size")


def test_reuse_freed_memory_takes_effect_on_glibc():
    import platform

    from rso_ext import runtime
    ok = runtime.reuse_freed_memory()
    assert ok == (platform.libc_ver()[0] == "glibc")


def test_memory_freed_to_the_heap_counts_as_available():
    import platform

    from rso_ext import memory, runtime
    if platform.libc_ver()[0] != "glibc" or not runtime.reuse_freed_memory():
        pytest.skip("glibc only")
    t = torch.empty(64 << 20, dtype=torch.uint8)
    t.fill_(1)
    during = runtime.heap_free_bytes()
    del t
    assert runtime.heap_free_bytes() >= during + (64 << 20) - (1 << 20)
    assert memory.available_bytes("cpu") >= runtime.heap_free_bytes()


def test_fused_estimate_counts_the_per_neuron_states():
    # paper_mnist at the paper's B=5000 on 55,000 images: 11 minibatches recur in each of
    # conv2's neurons (144 weights); each state is conv3's output for 5000 samples
    # (16 x 14 x 14 float32). conv1's neurons (9 weights) see no minibatch twice, and the
    # logits layer has no next layer: neither keeps states.
    from rso_ext.fused import lower
    from rso_ext import ops
    from rso_ext.fused.sweeper import FusedSweeper, fused_sweep_estimate, left_out_state_bytes
    net = models.paper_mnist(torch.Generator().manual_seed(0))
    x = torch.zeros(2, 1, 28, 28)
    trace = memory.trace_footprint(net, x)
    plan = lower(net, x)
    found = {}
    for unit in visit_units(net, x):
        found[unit.name] = memory.sweep_estimate(net, unit.module, FusedSweeper(plan, unit),
                                                 55000, 5000, trace=trace)
    state = 11 * 5000 * 16 * 14 * 14 * 4
    plain, _ = fused_sweep_estimate(trace, net.conv2, 55000, 5000)
    assert found["conv2.weight"][0] == plain + state
    assert found["conv2.weight"][1].endswith(f"per-neuron states {memory.format_bytes(state)}")
    for name in ("conv1.weight", "fc.weight", "bn2.weight"):
        assert "per-neuron states" not in found[name][1], name
    # more minibatches than weights in a neuron: none recurs; four of 27,500 samples: capped
    assert left_out_state_bytes(trace, net.conv2, 144, 55000, 50) == 0
    assert left_out_state_bytes(trace, net.conv2, 144, 110000, 27500) == ops.left_out_budget()
