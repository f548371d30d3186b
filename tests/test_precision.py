"""rso_ext.precision: exact float32 (no TF32) by default while searching, TF32 on request."""
from __future__ import annotations

import pytest
import torch

from rso_ext import RSO, cli
from rso_ext.contract import from_config
from rso_ext.precision import during, precision

from helpers import tiny_net, toy_data


def _flags():
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


def test_precision_sets_and_restores_the_tf32_flags():
    before = _flags()
    with precision("tf32"):
        assert _flags() == (True, True)
        with precision("exact"):
            assert _flags() == (False, False)
        assert _flags() == (True, True)
    assert _flags() == before
    with pytest.raises(ValueError, match="precision"):
        with precision("bf16"):
            pass


def test_during_applies_the_mode_to_each_step_only():
    seen = []

    def steps():
        for _ in range(3):
            seen.append(_flags())
            yield len(seen)

    before = _flags()
    for _ in during(steps(), "tf32"):
        assert _flags() == before          # the caller's code between steps keeps its flags
    assert seen == [(True, True)] * 3


@pytest.mark.parametrize("mode", ["exact", "tf32"])
def test_rso_sweeps_under_its_precision(mode, monkeypatch):
    # what the flags are while a unit is swept: recorded by the model's forward on more than
    # the 2 samples its set-up probes shapes with
    net = tiny_net(seed=1)
    seen = []
    net.conv1.register_forward_hook(
        lambda m, inp, out: seen.append(_flags()) if inp[0].shape[0] > 2 else None)
    x, y = toy_data(60)
    rso = RSO(net, cycles=1, batch_size=20, backend="torch", precision=mode)
    rso.calibrate(x)                     # also sets up the units (shape tracing on 2 samples)
    want = (mode == "tf32",) * 2
    assert seen and seen[-1] == want     # the calibration's forward
    seen.clear()
    rso.sweep_unit(0, x, y, weights=2)
    assert seen and all(f == want for f in seen)
    with pytest.raises(ValueError, match="precision must be one of"):
        RSO(tiny_net(), precision="fast")


def test_cli_takes_the_precision_and_hands_it_to_rso():
    args = ["train", "--model", "paper_mnist", "--out", "unused"]
    parser = cli.build_parser()
    assert parser.parse_args(args).precision == "exact"
    assert parser.parse_args(args + ["--precision", "tf32"]).precision == "tf32"
    with pytest.raises(SystemExit):
        parser.parse_args(args + ["--precision", "bf16"])
    g = torch.Generator().manual_seed(0)
    cfg = {"method": "rso", "cycles": 1, "batch_size": 8, "precision": "tf32"}
    assert from_config(cfg, tiny_net(), g).precision == "tf32"
    del cfg["precision"]                 # a run folder written before the option: exact
    assert from_config(cfg, tiny_net(), g).precision == "exact"
