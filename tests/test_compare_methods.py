"""benchmarks/compare_methods.py end to end at a tiny budget: trials on validation, a final run per
method under the CPU budget, the JSON keys, and a rerun that resumes from runs.json."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_methods.py"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def script():
    spec = importlib.util.spec_from_file_location("compare_methods", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compare_methods_tiny_budget_and_resume(script, tmp_path, capsys):
    args = ["--task", "paper_mnist", "--data-root", "embedded", "--train-size", "300",
            "--val-size", "100", "--budget", "0.6", "--trials", "2", "--trial-fraction", "0.5",
            "--points", "2", "--methods", "rso,es,sgd", "--out", str(tmp_path)]
    assert script.main(args) == 0
    first = capsys.readouterr().out
    doc = json.loads((tmp_path / "compare_methods_paper_mnist_cpu.json").read_text())
    res = doc["result"]
    for m in ("rso", "es", "sgd"):
        assert 0.0 <= res[f"test_acc_{m}"] <= 1.0
        assert res[f"cpu_seconds_{m}"] >= 0.6 or doc["methods"][m]["cycles"] is not None
        assert res[f"seconds_{m}"] > 0
        assert len(doc["methods"][m]["trials"]) == 2
        assert doc["methods"][m]["hparams"] in script.GRIDS[m][:2]
    assert doc["methods"]["rso"]["cycles"] >= 1
    assert first.count("trial") >= 6
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert set(runs) == {f"{m}/{k}" for m in ("rso", "es", "sgd")
                         for k in ("trial0", "trial1", "final")}
    assert all(r["commit"] and r["device"] for r in runs.values())
    out_json = tmp_path / "compare_methods_paper_mnist_cpu.json"
    assert json.loads(out_json.read_text())["device"] == runs["rso/final"]["device"]
    # a rerun finds every run in runs.json and trains nothing
    assert script.main(args) == 0
    again = capsys.readouterr().out
    assert "trial 0" not in again and "final" not in again.split("| method")[0]
    assert json.loads(out_json.read_text())["result"] == res
    # final runs made on another CPU: the JSON (and the plot's title) names every CPU
    runs["sgd/final"]["device"] = "Other CPU"
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    assert script.main(args) == 0
    capsys.readouterr()
    assert json.loads(out_json.read_text())["device"] == ", ".join(
        sorted({runs["rso/final"]["device"], "Other CPU"}))
    # a rerun under another budget would mix incomparable runs: refused, naming the setting
    before = (tmp_path / "runs.json").read_text()
    with pytest.raises(SystemExit):
        script.main([a if a != "0.6" else "0.7" for a in args])
    assert "--budget (kept 0.6, given 0.7)" in capsys.readouterr().err
    assert (tmp_path / "runs.json").read_text() == before


def test_compare_methods_refuses_bad_arguments(script, tmp_path):
    with pytest.raises(SystemExit):
        script.main(["--methods", "rso,adam", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        script.main(["--trials", "9", "--out", str(tmp_path)])


def test_release_frees_a_stopped_run(script):
    """A per-weight run stopped inside a unit holds its pool caches in a suspended generator
    whose stop hook refers back to the runner; release() must free them without waiting for
    the cycle collector (it kept GBs per earlier run on the full MNIST)."""
    import gc
    import weakref

    from rso_ext import data
    s = data.load_splits("mnist", root=None, val_size=100, seed=0)
    x, y = s.train_x[:200], s.train_y[:200]

    def stopped_run():
        r = script.build("rso", dict(batch_size=50), "paper_mnist", x, y, 0, 1)
        script.run(r, 0.05, 1, lambda r: {}, "t")
        return r

    gc.disable()                 # what a process does between two automatic collections
    try:
        r = stopped_run()
        kept = weakref.ref(r.search)
        del r
        assert kept() is not None, "no reference cycle: the test no longer tests release()"
        gc.collect()
        r = stopped_run()
        freed = weakref.ref(r.search)
        script.release(r)
        assert freed() is None
    finally:
        gc.enable()
