"""The programs in examples/ run, at tiny sizes (each a smoke test of what a reader copies)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from rso_ext import RSO, models
from rso_ext.fused import lower
from rso_ext.ops import CONV, FLATTEN, LINEAR, MAXPOOL, RELU

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytestmark = pytest.mark.usefixtures("one_thread")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def blog():
    return _load("blog_mnist")


def test_every_example_has_a_smoke_test():
    here = Path(__file__).read_text()
    for f in EXAMPLES.glob("*.py"):
        assert f'_load("{f.stem}")' in here, f"{f.name} has no smoke test here"


def test_blog_loop_with_ticket_finder(blog, capsys):
    acc = blog.main(["--train-size", "256", "--max-steps", "3", "--weights-per-step", "4",
                     "--log-interval", "1"])
    out = capsys.readouterr().out
    assert 0.0 <= acc <= 1.0
    assert out.count("Train Epoch: 1") == 3 and "Test set: Average loss" in out
    assert "visited 12 of 1,199,882 weights (0 full sweeps)" in out


def test_blog_net_trained_by_the_class_form_on_the_fused_backend(blog, capsys):
    acc = blog.main(["--mode", "fast", "--train-size", "256", "--rso-batch-size", "64",
                     "--max-units", "2"])
    out = capsys.readouterr().out
    assert "RSO backend fused" in out
    assert "fc2.weight: 1280 weights" in out and "Test set: Average loss" in out
    assert acc > 0.12                       # the last layer alone lifts it above chance


def test_the_blogs_net_as_written_lowers(blog):
    """F.max_pool2d, the dropout modules, torch.flatten and the final F.log_softmax: one program
    per unit, the log-softmax folded away (the last op of fc2's program is fc2 itself)."""
    net = blog.Net()
    plan = lower(net, torch.zeros(2, 1, 28, 28))
    assert [s.kind for s in plan.steps] == [CONV, RELU, CONV, RELU, MAXPOOL, FLATTEN, LINEAR,
                                            RELU, LINEAR]
    assert plan.steps[4].params[:2] == [2, 2]             # F.max_pool2d(x, 2): kernel 2, stride 2
    rso = RSO(net, cycles=1, batch_size=8)
    rso.check(torch.zeros(16, 1, 28, 28), torch.zeros(16, dtype=torch.long))
    assert rso.backend == "fused", rso.backend_reason


def test_rso_paper_mnist_example_and_its_saved_state(tmp_path, capsys):
    ex = _load("rso_paper_mnist")
    state = tmp_path / "rso.pt"
    acc = ex.main(["--train-size", "256", "--batch-size", "32", "--cycles", "1",
                   "--max-units", "3", "--save", str(state)])
    out = capsys.readouterr().out
    assert 0.0 <= acc <= 1.0 and "test accuracy" in out
    again = RSO(models.paper_mnist(), cycles=1, batch_size=32)
    again.load_state_dict(torch.load(state, weights_only=False))
    assert (again.cycle, again.unit) == (0, 3)
