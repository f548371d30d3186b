"""benchmarks/gpu_suite.py: the time accounting of its steps (the whole rehearsal runs in CI)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"


@pytest.fixture()
def suite(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_suite", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_suite", mod)    # its dataclasses look it up
    spec.loader.exec_module(mod)
    return mod


def test_a_hanging_step_is_killed_at_its_limit_and_the_next_still_runs(suite, tmp_path):
    py = sys.executable
    steps = [suite.Step("hangs", [py, "-c", "import time; time.sleep(30)"], 1.0),
             suite.Step("fails", [py, "-c", "raise SystemExit(3)"], 20),
             suite.Step("missing", ["no-such-program-rso"], 20, optional=True),
             suite.Step("skipped", [py, "-c", "pass"], 20, skip="not on this machine"),
             suite.Step("works", [py, "-c", "print('hello')"], 20)]
    recs = {r["name"]: r for r in suite.run_steps(steps, 60, tmp_path)}
    assert recs["hangs"]["timed_out"] and recs["hangs"]["seconds"] < 10
    assert "killed at its limit" in (tmp_path / "hangs.log").read_text()
    assert recs["fails"]["rc"] == 3 and not suite.passed(recs["fails"])
    assert recs["missing"]["rc"] == 127 and recs["missing"]["optional"]
    assert recs["skipped"]["skipped"] == "not on this machine" and suite.passed(recs["skipped"])
    assert recs["works"]["rc"] == 0 and "hello" in (tmp_path / "works.log").read_text()


def test_the_budget_is_shared_and_a_spent_budget_skips_the_rest(suite, tmp_path):
    py = sys.executable
    steps = [suite.Step("long", [py, "-c", "import time; time.sleep(30)"], 100),
             suite.Step("after", [py, "-c", "pass"], 100)]
    recs = suite.run_steps(steps, 1.5, tmp_path)
    assert recs[0]["timed_out"] and recs[0]["limit_s"] == pytest.approx(1.5, abs=0.2)
    assert recs[1]["skipped"] == "the total budget was spent"


def test_the_rehearsal_steps_name_no_gpu_tool(suite, tmp_path):
    steps = suite.build_steps(tmp_path, rehearse=True, data_root=None)
    ran = [s for s in steps if s.skip is None]
    assert {s.name for s in ran} == {"environment", "tests", "bench_perturb", "reproduce_paper"}
    for s in ran:
        assert "cuda" not in s.argv and "compute-sanitizer" not in s.argv[0], s.name
    gpu = {s.name: s for s in suite.build_steps(tmp_path, rehearse=False, data_root="data/mnist")}
    assert gpu["build"].env["RSO_EXT_CUDA"] == "1"
    assert "--max-seconds" in gpu["reproduce_paper"].argv
    assert gpu["bench_perturb"].argv[gpu["bench_perturb"].argv.index("--batch-size") + 1] == "5000"
    assert json.dumps([s.argv for s in gpu.values()])   # plain strings throughout
