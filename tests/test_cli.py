"""The command line end to end on tiny data: train, metrics, checkpoints, resume, eval, plot."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rso_ext import checkpoint, cli, data, models

from helpers import tiny_net


def tiny_mnist_net(generator=None):
    """paper_mnist's layer kinds at a width that keeps these tests fast (28x28 input, 10 classes)."""
    net = tiny_net()
    net.fc = torch.nn.Linear(4, 10, bias=False)
    return models.he_init_(net, generator)


@pytest.fixture(autouse=True, scope="module")
def _register_tiny_model():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(models.MODELS, "tiny", tiny_mnist_net)
        yield


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """A 200/100-image MNIST-format root cut from the embedded subset."""
    root = tmp_path_factory.mktemp("mnist")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 200), ("t10k", 100)):
        src = data.embedded_root() / "MNIST" / "raw"
        imgs = data.read_idx(src / f"{split}-images-idx3-ubyte.gz")[:n]
        labels = data.read_idx(src / f"{split}-labels-idx1-ubyte.gz")[:n]
        data.write_idx(raw / f"{split}-images-idx3-ubyte.gz", imgs)
        data.write_idx(raw / f"{split}-labels-idx1-ubyte", labels)    # raw works too
    return root


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data-root", str(root), "--out", str(out), "--batch-size", "25",
            "--val-size", "50", "--calib-size", "60", "--cycles", "2", "--no-progress",
            "--seed", "3", "--model", "tiny", *extra]


def _lines(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / cli.METRICS).read_text().splitlines()]
    for r in rows:
        r.pop("seconds", None)
        r.pop("cpu_seconds", None)
    return rows


def _cpu_seconds(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / cli.METRICS).read_text().splitlines()]
    return [r["cpu_seconds"] for r in rows if r["type"] == "cycle"]


def _weights(run: Path) -> dict:
    return checkpoint.load(run / cli.CKPT)["rso"]["model"]


@pytest.fixture(scope="module")
def full_run(tiny_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "full"
    assert cli.main(_args(tiny_root, out)) == 0
    return out


def test_train_writes_metrics_checkpoint_and_result(full_run):
    rows = _lines(full_run)
    sweeps = [r for r in rows if r["type"] == "sweep"]
    cycles = [r for r in rows if r["type"] == "cycle"]
    assert len(sweeps) == 2 * 7 and [c["cycle"] for c in cycles] == [1, 2]
    assert {"val_acc", "test_acc", "val_loss", "test_loss"} <= set(cycles[0])
    c1, c2 = _cpu_seconds(full_run)
    assert 0 < c1 < c2
    result = json.loads((full_run / cli.RESULT).read_text())
    assert 0.0 <= result["test_acc"] <= 1.0 and result["cycles"] == 2
    assert json.loads((full_run / cli.CONFIG).read_text())["batch_size"] == 25


def test_interrupted_run_resumes_to_the_same_weights_and_metrics(tiny_root, full_run, tmp_path,
                                                                 monkeypatch):
    out = tmp_path / "cut"
    saves = {"n": 0}
    real_save = checkpoint.save

    def dying_save(obj, path):
        real_save(obj, path)
        saves["n"] += 1
        if saves["n"] == 10:                          # inside cycle 2
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        cli.main(_args(tiny_root, out))
    monkeypatch.setattr(checkpoint, "save", real_save)
    # a line logged after the last checkpoint must not be duplicated on resume
    with open(out / cli.METRICS, "a") as f:
        f.write(json.dumps({"type": "sweep", "stale": True}) + "\n")
    # the resumed process's clock stands still: cycle 2's CPU seconds are then exactly what the
    # checkpoint carried over, which includes cycle 1's
    monkeypatch.setattr(cli.time, "process_time", lambda: 0.0)
    assert cli.main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert _lines(out) == _lines(full_run)
    c1, c2 = _cpu_seconds(out)
    assert 0 < c1 <= c2
    a, b = _weights(out), _weights(full_run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_and_plot(full_run, capsys):
    assert cli.main(["eval", str(full_run)]) == 0
    out = json.loads(capsys.readouterr().out)
    result = json.loads((full_run / cli.RESULT).read_text())
    assert out["test_acc"] == pytest.approx(result["test_acc"])
    pytest.importorskip("matplotlib")
    assert cli.main(["plot", str(full_run)]) == 0
    assert (full_run / "curves.png").stat().st_size > 1000


def test_plot_draws_a_run_that_has_not_finished_a_cycle(full_run, tmp_path):
    pytest.importorskip("matplotlib")
    part = tmp_path / "part"
    part.mkdir()
    (part / cli.CONFIG).write_text((full_run / cli.CONFIG).read_text())
    rows = (full_run / cli.METRICS).read_text().splitlines()
    (part / cli.METRICS).write_text("\n".join(rows[:3]) + "\n")     # three unit sweeps
    assert all(json.loads(r)["type"] == "sweep" for r in rows[:3])
    assert cli.main(["plot", str(part), "--output", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000
    (part / cli.METRICS).write_text("")
    with pytest.raises(SystemExit, match="no finished unit sweep"):
        cli.main(["plot", str(part)])


def test_train_says_which_backend_runs_and_ends_with_a_summary(tiny_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_args(tiny_root, out, "--cycles", "1")) == 0
    text = capsys.readouterr().out
    assert "backend fused: backend='auto' and the model lowers" in text
    result = json.loads((out / cli.RESULT).read_text())
    assert f"test {100 * result['test_acc']:.2f} %" in text
    assert f"python -m rso_ext plot {out}" in text and cli.PAPER_COMMAND in text
    assert cli.main(_args(tiny_root, tmp_path / "t", "--cycles", "1", "--backend", "torch")) == 0
    assert "backend torch: asked for with backend='torch'" in capsys.readouterr().out


def test_bad_arguments_are_named(tiny_root, tmp_path, capsys):
    assert cli.main(_args(tiny_root, tmp_path / "r1", "--batch-size", "500")) == 2
    assert "batch_size=500 is larger than the training set" in capsys.readouterr().err
    assert cli.main(["train", "--data-root", str(tmp_path), "--out", str(tmp_path / "r2")]) == 2
    assert "train-images-idx3-ubyte" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--batch-size", "0"])
    with pytest.raises(SystemExit, match="not a run folder"):
        cli.main(["train", "--resume", str(tmp_path)])


def test_variant_options_reach_the_run_and_its_resume(tiny_root, tmp_path, capsys):
    out = tmp_path / "variant"
    extra = ("--candidate-steps", "1,2", "--batch-start", "10", "--cycles", "3")
    assert cli.main(_args(tiny_root, out, *extra)) == 0
    cfg = json.loads((out / cli.CONFIG).read_text())
    assert cfg["candidate_steps"] == [1.0, 2.0] and cfg["batch_start"] == 10
    assert "B=25 (from 10, doubled per cycle)" in capsys.readouterr().out
    hp = checkpoint.load(out / cli.CKPT)["rso"]["hparams"]
    assert hp["candidate_steps"] == (1.0, 2.0) and hp["batch_start"] == 10
    sweeps = [r for r in _lines(out) if r["type"] == "sweep"]
    n = sum(p.numel() for p in tiny_mnist_net().parameters())
    assert sweeps[-1]["evaluations"] == n * 5 * (10 + 20 + 25)
    # an interrupted variant run resumes with its options (config.json), not the defaults
    cut = tmp_path / "cut"
    (cut).mkdir()
    (cut / cli.CONFIG).write_text((out / cli.CONFIG).read_text())
    assert cli.main(["train", "--resume", str(cut), "--no-progress"]) == 0
    a, b = _weights(out), _weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for bad in ("0", "1,1", "1,x", "nan"):
        with pytest.raises(SystemExit):
            cli.main(_args(tiny_root, tmp_path / "bad", "--candidate-steps", bad))
        assert "--candidate-steps" in capsys.readouterr().err
    assert cli.main(_args(tiny_root, tmp_path / "bad", "--batch-start", "30")) == 2
    assert "batch_start must be in [1, 25], got 30" in capsys.readouterr().err


def test_existing_run_is_never_overwritten(full_run, tiny_root):
    before = (full_run / cli.METRICS).read_bytes()
    with pytest.raises(SystemExit, match="already holds a run"):
        cli.main(_args(tiny_root, full_run))
    assert (full_run / cli.METRICS).read_bytes() == before


def test_corrupted_checkpoint_is_detected(full_run, tmp_path):
    bad = tmp_path / "ck.pt"
    raw = (full_run / cli.CKPT).read_bytes()
    bad.write_bytes(raw[:-10])
    with pytest.raises(checkpoint.CheckpointError, match="corrupted"):
        checkpoint.load(bad)
    bad.write_bytes(b"junk")
    with pytest.raises(checkpoint.CheckpointError, match="not an rso_ext checkpoint"):
        checkpoint.load(bad)
