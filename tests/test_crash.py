"""Crash safety of ``python -m rso_ext train``: SIGKILL at random moments, corrupted checkpoints,
a loss that turns non-finite mid-run.

The kill test runs the CLI in real processes (forked by ``tests/cli_tiny.py serve``, which adds the
``tiny`` model) and kills them with SIGKILL after seeded random delays, resuming each time with
``--resume``; the result must equal an uninterrupted run (a fresh interpreter) bit for bit:
weights, metrics.jsonl (``seconds`` aside) and result.json.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rso_ext import checkpoint, cli, models
from rso_ext.sweep import NonFiniteLossError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_tiny import tiny_mnist_net  # noqa: E402
from helpers import mnist_root  # noqa: E402

HELPER = Path(__file__).resolve().parent / "cli_tiny.py"
REPO = Path(__file__).resolve().parent.parent
KILLS = 20                   # SIGKILLs to deliver (fewer only if the run finishes first)
KILL_BUDGET_S = 40.0         # stop killing after this long and let the run finish

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """A 200/100-image MNIST-format root cut from the embedded subset."""
    return mnist_root(tmp_path_factory.mktemp("mnist"), 200, 100)


def _args(root: Path, out: Path, cycles: int = 2) -> list[str]:
    return ["train", "--data-root", str(root), "--out", str(out), "--batch-size", "25",
            "--val-size", "50", "--calib-size", "60", "--cycles", str(cycles), "--no-progress",
            "--seed", "3", "--model", "tiny", "--threads", "1", "--backend", "torch"]


def _lines(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / cli.METRICS).read_text().splitlines()]
    for r in rows:
        r.pop("seconds", None)
        r.pop("cpu_seconds", None)      # clocks differ between runs; everything else may not
    return rows


def _result(run: Path) -> dict:
    r = json.loads((run / cli.RESULT).read_text())
    r.pop("seconds")
    return r


def _assert_same_run(a: Path, b: Path) -> None:
    assert _lines(a) == _lines(b)
    wa = checkpoint.load(a / cli.CKPT)["rso"]["model"]
    wb = checkpoint.load(b / cli.CKPT)["rso"]["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _result(a) == _result(b)


class _Server:
    """Client of ``cli_tiny.py serve``: start a CLI run in a forked process, kill it, wait."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, str(HELPER), "serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, cwd=REPO)
        self.buf = b""
        assert self.line(timeout=60) == "ready"

    def line(self, timeout: float) -> str | None:
        """The next line from the server, or None if none came within ``timeout`` seconds."""
        end = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError("cli_tiny.py serve exited")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\n", 1)
        return head.decode()

    def start(self, argv: list[str], log: Path) -> int:
        self.proc.stdin.write((json.dumps({"argv": argv, "log": str(log)}) + "\n").encode())
        self.proc.stdin.flush()
        msg = self.line(timeout=30)
        assert msg and msg.startswith("pid "), msg
        return int(msg.split()[1])

    def exit_code(self, timeout: float) -> int | None:
        msg = self.line(timeout)
        if msg is None:
            return None
        assert msg.startswith("exit "), msg
        return int(msg.split()[1])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


TRAINING = "\ntraining "                     # what the CLI prints when its first sweep starts


def _wait_for_training(server: _Server, log: Path, before: int, timeout: float) -> int | None:
    """Wait until the child says it starts training (None) or exits (its exit code)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if log.exists() and log.read_text().count(TRAINING) > before:
            return None
        rc = server.exit_code(timeout=0.005)
        if rc is not None:
            return rc
    raise AssertionError("the CLI did not start training:\n" + log.read_text()[-3000:])


def _count(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def _wait_for_lines(server: _Server, path: Path, lines: int, timeout: float) -> int | None:
    """Wait until ``path`` has ``lines`` lines (None) or the child exits (its exit code)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if _count(path) >= lines:
            return None
        rc = server.exit_code(timeout=0.005)
        if rc is not None:
            return rc
    raise AssertionError(f"{path} did not reach {lines} lines")


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tiny_root, tmp_path):
    cycles = 24        # 168 unit sweeps + 24 cycle records: long enough for every kill on a fast machine
    ref, run, log = tmp_path / "ref", tmp_path / "killed", tmp_path / "log.txt"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    reference = subprocess.Popen([sys.executable, str(HELPER), "run",
                                  *_args(tiny_root, ref, cycles)], env=env, cwd=REPO,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rng = random.Random(20240607)
    server = _Server()
    kills, attempts, progress, stale_tmp = 0, 0, [], 0
    t0 = time.monotonic()
    try:
        while True:
            attempts += 1
            assert attempts <= KILLS + 5, "the run does not finish"
            if (run / cli.CONFIG).exists():
                stale_tmp += len(list(run.glob(".*.tmp*")))
                argv = ["train", "--resume", str(run), "--no-progress"]
            else:                                  # killed before the run folder was complete
                argv = _args(tiny_root, run, cycles)
            started = log.read_text().count(TRAINING) if log.exists() else 0
            pid = server.start(argv, log)
            rc = None
            if kills < KILLS and time.monotonic() - t0 < KILL_BUDGET_S:
                if rng.random() < 0.25:           # during start-up, resume or the first sweep
                    rc = server.exit_code(timeout=rng.uniform(0.0, 0.8))
                else:                              # during training: after 0-3 more unit
                    lines = _count(run / cli.METRICS)  # sweeps, at a random moment of the next
                    rc = _wait_for_training(server, log, started, timeout=30)
                    if rc is None:
                        rc = _wait_for_lines(server, run / cli.METRICS, lines + rng.randint(0, 3),
                                             timeout=30)
                    if rc is None:
                        rc = server.exit_code(timeout=rng.uniform(0.0, 0.2))
                if rc is None:
                    os.kill(pid, signal.SIGKILL)
                    rc = server.exit_code(timeout=30)
                    assert rc in (-signal.SIGKILL, 0), rc
                    if rc == -signal.SIGKILL:
                        kills += 1
                        progress.append(_count(run / cli.METRICS))
            if rc is None:
                rc = server.exit_code(timeout=120)
            if rc == 0:
                break
            assert rc == -signal.SIGKILL, f"exit {rc}:\n" + log.read_text()[-3000:]
    finally:
        server.close()
    assert reference.wait(timeout=120) == 0, reference.stderr.read().decode()[-3000:]
    elapsed = time.monotonic() - t0
    print(f"\n{kills} SIGKILLs survived in {attempts} starts ({elapsed:.1f} s); metrics lines "
          f"at each kill: {progress}; stale temporary files cleaned on resume: {stale_tmp}")
    assert kills >= KILLS // 2                     # all of them unless the time budget ran out
    assert len(set(progress)) >= 5                 # the kills hit many different moments
    assert log.read_text().count("resuming") >= 5
    _assert_same_run(run, ref)
    assert not list(run.glob(".*.tmp*"))


# -- corrupted checkpoints: fall back to the previous one, or name both -----------------------------
@pytest.fixture(scope="module")
def _tiny_model():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(models.MODELS, "tiny", tiny_mnist_net)
        yield


@pytest.fixture(scope="module")
def full_run(tiny_root, tmp_path_factory, _tiny_model) -> Path:
    out = tmp_path_factory.mktemp("runs") / "full"
    assert cli.main(_args(tiny_root, out)) == 0
    return out


def _cut_run(root: Path, out: Path, monkeypatch, after_saves: int) -> None:
    """Train until ``after_saves`` checkpoints are written, then stop as if killed."""
    saves = {"n": 0}
    real_save = checkpoint.save

    def dying_save(obj, path, **kw):
        real_save(obj, path, **kw)
        saves["n"] += 1
        if saves["n"] == after_saves:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        cli.main(_args(root, out))
    monkeypatch.setattr(checkpoint, "save", real_save)


def _damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[:len(raw) // 2])
    elif how == "flipped":
        b = bytearray(raw)
        b[len(b) // 2] ^= 0xFF
        path.write_bytes(bytes(b))
    elif how == "header":
        path.write_bytes(b"PK\x03\x04" + raw[4:])
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["truncated", "flipped", "header", "missing"])
def test_bad_latest_checkpoint_falls_back_to_the_previous_one(tiny_root, full_run, tmp_path,
                                                             monkeypatch, capsys, how):
    out = tmp_path / "cut"
    _cut_run(tiny_root, out, monkeypatch, after_saves=10)
    prev = checkpoint.previous_path(out / cli.CKPT)
    assert checkpoint.load(prev)["metrics_lines"] < checkpoint.load(out / cli.CKPT)["metrics_lines"]
    _damage(out / cli.CKPT, how)
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(out), "--no-progress"]) == 0
    err = capsys.readouterr()
    assert f"warning: checkpoint {out / cli.CKPT}" in err.err or \
        f"warning: {out / cli.CKPT} is not an rso_ext checkpoint" in err.err
    assert f"using the previous checkpoint {prev}" in err.err
    assert "(from checkpoint.prev.pt)" in err.out
    _assert_same_run(out, full_run)              # the metrics were cut back to the older count


def test_no_good_checkpoint_names_both_files_and_changes_nothing(tiny_root, tmp_path,
                                                                 monkeypatch, capsys, _tiny_model):
    out = tmp_path / "cut"
    _cut_run(tiny_root, out, monkeypatch, after_saves=4)
    ck, prev = out / cli.CKPT, checkpoint.previous_path(out / cli.CKPT)
    _damage(ck, "flipped")
    _damage(prev, "truncated")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for argv in (["train", "--resume", str(out), "--no-progress"], ["eval", str(out)]):
        capsys.readouterr()
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert str(ck) in err and str(prev) in err and "no good checkpoint" in err
        assert "Traceback" not in err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(checkpoint.CheckpointError, match="no good checkpoint"):
        checkpoint.load_latest(ck)


def test_checkpoint_format_version_and_rotation(tmp_path):
    p = tmp_path / "c.pt"
    assert checkpoint.load_latest(p) is None
    checkpoint.save({"a": 1}, p)
    assert not checkpoint.previous_path(p).exists()
    checkpoint.save({"a": 2}, p)
    checkpoint.save({"a": 3}, p)
    assert checkpoint.load(p) == {"a": 3}
    assert checkpoint.load(checkpoint.previous_path(p)) == {"a": 2}
    assert checkpoint.load_latest(p) == ({"a": 3}, p)
    _damage(p, "flipped")
    with pytest.warns(checkpoint.CheckpointWarning, match="corrupted.*using the previous"):
        assert checkpoint.load_latest(p) == ({"a": 2}, checkpoint.previous_path(p))
    checkpoint.save({"a": 4}, p)                  # a bad latest file never becomes "previous"
    assert checkpoint.load(checkpoint.previous_path(p)) == {"a": 2}
    raw = p.read_bytes()
    p.write_bytes(b"RSOCKPT9" + raw[8:])
    with pytest.raises(checkpoint.CheckpointError, match="format version '9'"):
        checkpoint.load(p)
    assert not list(tmp_path.glob(".*tmp*"))


# -- a loss that turns non-finite mid-run ------------------------------------------------------------
def test_non_finite_loss_mid_run_stops_naming_the_weight_and_keeps_the_last_good_checkpoint(
        tiny_root, full_run, tmp_path, monkeypatch, capsys):
    """After the 5th checkpoint a weight of ``fc`` is set to inf behind the run's back: the next
    unit sweep (bn1.bias) finds its current loss NaN and must stop, naming layer, neuron and
    weight, printing no traceback, with checkpoint 5 intact; resuming from it completes the run
    exactly as if nothing had happened."""
    out = tmp_path / "poisoned"
    built, saved = {}, {}
    real_build, real_save = cli._build, checkpoint.save

    def build(cfg, device):
        built["rso"] = real_build(cfg, device)
        return built["rso"]

    def save(obj, path, **kw):
        real_save(obj, path, **kw)
        saved["n"] = saved.get("n", 0) + 1
        if saved["n"] == 5:
            saved["state"] = obj
            with torch.no_grad():
                built["rso"].model.fc.weight[2, 1] = math.inf

    monkeypatch.setattr(cli, "_build", build)
    monkeypatch.setattr(checkpoint, "save", save)
    capsys.readouterr()
    assert cli.main(_args(tiny_root, out)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(r"error: cycle 0: the loss of the current weights is (nan|inf) at layer "
                     r"'bn1.bias', weight 0 \(index \(0,\)\) of neuron 0", err), err
    assert f"the last good checkpoint is kept: {out / cli.CKPT}" in err
    assert saved["n"] == 5 and not (out / cli.RESULT).exists()
    ck = checkpoint.load(out / cli.CKPT)
    kept, want = ck["rso"]["model"], saved["state"]["rso"]["model"]
    assert all(torch.equal(kept[k], want[k]) and torch.isfinite(kept[k]).all() for k in kept)
    assert len((out / cli.METRICS).read_text().splitlines()) == ck["metrics_lines"] == 5
    monkeypatch.setattr(cli, "_build", real_build)
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert cli.main(["train", "--resume", str(out), "--no-progress"]) == 0
    _assert_same_run(out, full_run)


def test_non_finite_candidates_are_never_chosen_and_the_error_names_the_neuron():
    from helpers import tiny_net, toy_data
    from rso_ext import RSO

    class Guard(torch.nn.Module):
        """NaN logits wherever a logit leaves [-30, 30]: big steps give non-finite losses."""

        def forward(self, h):
            return torch.where(h.abs() > 30, torch.full_like(h, math.nan), h)

    x, y = toy_data(60)
    net = torch.nn.Sequential(*tiny_net(), Guard())
    rso = RSO(net, cycles=1, batch_size=20, calib_size=30, sample_scale=1e4, backend="torch")
    stats = [rso.sweep_unit(i, x, y) for i in range(3)]
    assert all(math.isfinite(s.mean_loss) for s in stats)
    assert all(torch.isfinite(p).all() for p in net.parameters())
    with torch.no_grad():
        net[4].weight[2, 1, 0, 2] = math.inf          # conv2: the first sweep (fc) sees it
    rso2 = RSO(net, cycles=1, batch_size=20, calib_size=30, backend="torch")
    with pytest.raises(NonFiniteLossError, match=r"cycle 0: .* at layer '8.weight', weight 0 "
                                                 r"\(index \(0, 0\)\) of neuron 0"):
        list(rso2.run(x, y))
    from rso_ext.sweep import non_finite
    from rso_ext.visit import Unit
    e = non_finite(Unit("4", "weight", net[4], 4), 2 * 27 + 1 * 9 + 0 * 3 + 2, math.inf)
    assert str(e).endswith("at layer '4.weight', weight 65 (index (2, 1, 0, 2)) of neuron 2")
    e = non_finite(Unit("5", "bias", net[5], 5), 3, math.nan)
    assert str(e).endswith("at layer '5.bias', weight 3 (index (3,)) of neuron 3")
