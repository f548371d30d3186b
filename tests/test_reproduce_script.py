"""benchmarks/reproduce_paper.py end to end in this process, on a tiny model and tiny data."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from rso_ext import models

from helpers import tiny_net

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce_paper.py"


def tiny_mnist_net(generator=None):
    """paper_mnist's layer kinds at toy width (28x28 input, 10 classes), as in test_cli."""
    net = tiny_net()
    net.fc = torch.nn.Linear(4, 10, bias=False)
    return models.he_init_(net, generator)


@pytest.fixture()
def script(monkeypatch):
    monkeypatch.setitem(models.MODELS, "tiny", tiny_mnist_net)
    spec = importlib.util.spec_from_file_location("reproduce_paper", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("baseline", [0, 1])
def test_reproduce_paper_tiny(script, tmp_path, capsys, one_thread, baseline):
    out = tmp_path / "r.json"
    rc = script.main(["--model", "tiny", "--data-root", "embedded", "--train-size", "150",
                      "--val-size", "50", "--batch-size", "25", "--cycles", "2",
                      "--calib-size", "60", "--backend", "torch", "--seed", "3",
                      "--baseline-cycles", str(baseline), "--out", str(out),
                      *([] if baseline else ["--no-plot"])])
    assert rc == 0
    doc = json.loads(out.read_text())
    for k in ("device", "torch", "commit", "command", "rows", "result"):
        assert k in doc, k
    assert doc["commit"]
    rows = doc["rows"]
    assert [r["cycle"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 <= r["test_acc"] <= 1 and 0 <= r["val_acc"] <= 1
        assert r["units"] and all(u["seconds"] >= 0 for u in r["units"])
    assert rows[1]["seconds"] >= rows[0]["seconds"] > 0
    res = doc["result"]
    for k in ("test_acc_1", "test_acc_2", "seconds_1", "seconds_2"):
        assert k in res, k
    assert "test_acc_5" not in res and "test_acc_50" not in res
    assert ("ratio_cycle_vs_torch_cached" in res) == bool(baseline)
    if not baseline:
        assert doc["png"] is None
    elif doc["png"] is not None:
        assert (out.parent / doc["png"]).exists()      # the PNG sits beside the JSON
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT ")
    pairs = dict(kv.split("=", 1) for kv in last.split()[1:])
    assert set(pairs) == set(res)
    assert float(pairs["test_acc_2"]) == pytest.approx(res["test_acc_2"], rel=1e-5)


def test_from_run_reports_a_cli_run_folder(script, tmp_path, capsys, one_thread):
    """--from-run: the rows of a `python -m rso_ext train` folder (the way a run of hours is made
    resumable), equal to what the CLI recorded, with its CPU seconds; refusals are clear."""
    from rso_ext import cli
    run = tmp_path / "run"
    assert cli.main(["train", "--model", "tiny", "--out", str(run), "--batch-size", "25",
                     "--val-size", "50", "--train-size", "150", "--calib-size", "60",
                     "--cycles", "2", "--seed", "3", "--no-progress"]) == 0
    recs = [json.loads(x) for x in (run / cli.METRICS).read_text().splitlines()]
    cycles = [r for r in recs if r["type"] == "cycle"]
    out = tmp_path / "r.json"
    assert script.main(["--from-run", str(run), "--out", str(out), "--no-plot"]) == 0
    doc = json.loads(out.read_text())
    assert doc["run_config"]["batch_size"] == 25 and doc["batch_size"] == 25
    assert doc["train_size"] == 150 and doc["val_size"] == 50
    rows = doc["rows"]
    assert [r["cycle"] for r in rows] == [1, 2]
    for row, rec in zip(rows, cycles):
        for k in ("test_acc", "val_acc", "seconds", "cpu_seconds"):
            assert row[k] == rec[k], k
    sweeps = [r for r in recs if r["type"] == "sweep"]
    assert sum(len(r["units"]) for r in rows) == len(sweeps)
    assert rows[-1]["train_seconds"] == pytest.approx(sum(r["seconds"] for r in sweeps))
    res = doc["result"]
    assert res["test_acc_2"] == cycles[1]["test_acc"]
    assert res["cpu_seconds_2"] == cycles[1]["cpu_seconds"]
    capsys.readouterr()
    with pytest.raises(SystemExit, match="no config.json there"):
        script.main(["--from-run", str(tmp_path), "--out", str(out)])
    with pytest.raises(SystemExit, match="cannot go with --from-run"):
        script.main(["--from-run", str(run), "--baseline-cycles", "1", "--out", str(out)])


def test_max_seconds_stops_cleanly_with_the_cycles_finished(script, tmp_path, capsys, one_thread):
    common = ["--model", "tiny", "--data-root", "embedded", "--train-size", "150", "--val-size",
              "50", "--batch-size", "25", "--cycles", "3", "--calib-size", "60", "--backend",
              "torch", "--no-plot"]
    out = tmp_path / "r.json"
    # a clock that advances 0.1 s per reading makes the stop deterministic: the run stops
    # before its last cycle ends and the JSON holds the cycles that finished
    t = {"now": 0.0}
    real = script.time.perf_counter

    def fake_clock():
        t["now"] += 0.1
        return t["now"]
    script.time.perf_counter = fake_clock
    try:
        assert script.main(common + ["--max-seconds", "3", "--out", str(out)]) == 0
    finally:
        script.time.perf_counter = real
    doc = json.loads(out.read_text())
    finished = doc["result"]["cycles_finished"]
    assert doc["max_seconds"] == 3 and 1 <= finished < 3 and len(doc["rows"]) == finished
    assert "--max-seconds 3: stopped after" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no cycle finished within --max-seconds 0"):
        script.main(common + ["--max-seconds", "0", "--out", str(tmp_path / "none.json")])
