"""Every benchmark script starts: its argument parser builds and ``--help`` exits 0.

The benchmarks run for minutes to hours, so CI never runs them whole; this catches the
import-time and parser-time errors (a missing import in ``benchmarks/_env.py`` once made every
script fail before parsing its arguments) that would otherwise surface only at measurement time.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))


def test_there_are_benchmark_scripts():
    assert len(SCRIPTS) >= 3, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
@pytest.mark.parametrize("data_root", [None, "/nonexistent/mnist"])
def test_benchmark_help(script, data_root):
    env = dict(os.environ)
    env.pop("RSO_EXT_MNIST_ROOT", None)
    if data_root:
        env["RSO_EXT_MNIST_ROOT"] = data_root
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout


def test_bench_perturb_profile_names_each_profiled_unit(tmp_path):
    # the profile the GPU suite takes of a lease: a table of operators per backend and unit
    prof = tmp_path / "profile.txt"
    r = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_perturb.py"), "--quick", "--batch-size", "16",
         "--train-size", "64", "--calib-size", "32", "--budget", "2", "--data-root", "embedded",
         "--backends", "torch-cached,fused", "--threads", "1", "--out", str(tmp_path / "b.json"),
         "--profile", str(prof), "--profile-weights", "2"],
        capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    text = prof.read_text()
    for backend in ("torch-cached", "fused"):
        for unit in ("conv1.weight", "conv4.weight", "conv6.weight"):
            assert f"== {backend} {unit}: 2 weights" in text, text[:3000]
    assert "Self CPU" in text


def test_ablate_paper_runs_each_variant_once_and_resumes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RSO_EXT_MNIST_ROOT", None)          # the embedded subset
    cmd = [sys.executable, str(BENCHMARKS / "ablate_paper.py"), "--variants",
           "base,sampler_random,batch_doubling", "--batch-size", "16", "--train-size", "64",
           "--val-size", "40", "--cycles", "2", "--calib-size", "32", "--threads", "1",
           "--out-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "a.json")]
    if importlib.util.find_spec("matplotlib"):
        cmd += ["--plot", str(tmp_path / "a.png")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    doc = json.loads((tmp_path / "a.json").read_text())
    for v in ("base", "sampler_random", "batch_doubling"):
        res = doc["results"][v]
        assert 0 < res["val_acc_2"] <= 1 and 0 < res["test_acc_2"] <= 1, res
        assert 0 < res["cpu_seconds_1"] < res["cpu_seconds_2"], res
    assert "--sampler random" in doc["results"]["sampler_random"]["command"]
    assert "--batch-start 2" in doc["results"]["batch_doubling"]["command"]
    assert doc["variants"]["batch_doubling"] == {"--batch-start": "2"}
    assert r.stdout.count("ablate_paper: ") == 3
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "a.png").stat().st_size > 1000
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and "ablate_paper: " not in again.stdout   # nothing re-run
    assert json.loads((tmp_path / "a.json").read_text())["results"] == doc["results"]


def test_bench_prune_times_both_ways_and_they_leave_the_same_z(tmp_path):
    out = tmp_path / "p.json"
    cmd = [sys.executable, str(BENCHMARKS / "bench_prune.py"), "--model", "paper_mnist",
           "--unit", "conv6.weight", "--pool", "64", "--sample", "8", "--repeats", "2",
           "--data-root", "embedded", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["written"] == 1152 and doc["sample"] == 8 and doc["pool"] == 64
    assert len(doc["set_cpu_seconds"]) == len(doc["set_many_cpu_seconds"]) == 2
    assert doc["z_rel_diff"] < 1e-5 and doc["ratio"] > 0
    assert "RESULT model=paper_mnist unit=conv6.weight" in r.stdout
    bad = subprocess.run(cmd[:5] + ["conv9.weight"] + cmd[6:], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "not a unit of paper_mnist" in bad.stderr
    assert "conv6.weight" in bad.stderr
