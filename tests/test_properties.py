"""Bad input, systematically (hypothesis): every rejected input gets a clear error of the expected
type naming the argument or file, and leaves nothing behind (weights, generator, files).

Covers the RSO constructor, training tensors (shape, dtype, NaN/Inf, labels, lengths, batch
size), model structures the driver or the planner cannot take, corrupted IDX files, and the CLI's
arguments. The number of examples each test tried is printed at the end of the module
(``pytest -s``).
"""
from __future__ import annotations

import contextlib
import gzip
import io
import math
import os
import tempfile
from collections import Counter, OrderedDict
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from rso_ext import RSO, cli, data, models
from rso_ext.fused import PlanError

from helpers import CatDag, tiny_net, toy_data

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
TRIED: Counter = Counter()

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print("\nhypothesis inputs tried: " + ", ".join(f"{k} {v}" for k, v in sorted(TRIED.items()))
          + f"; total {sum(TRIED.values())}")


def _state(rso: RSO) -> tuple:
    return ({k: v.clone() for k, v in rso.model.state_dict().items()},
            rso.generator.get_state().clone())


def _unchanged(rso: RSO, before: tuple) -> bool:
    weights, gen = before
    now = rso.model.state_dict()
    return (all(torch.equal(now[k], v) for k, v in weights.items())
            and torch.equal(rso.generator.get_state(), gen))


# -- RSO constructor --------------------------------------------------------------------------------
def _not(values):
    return st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.just([1]), values)


BAD_ARGS = {
    "cycles": _not(st.one_of(st.integers(max_value=0), st.floats(allow_nan=True))),
    "batch_size": _not(st.one_of(st.integers(max_value=0), st.floats(allow_nan=True))),
    "calib_size": _not(st.one_of(st.integers(max_value=0), st.floats(allow_nan=True))),
    "alpha": _not(st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.000001),
                            st.just(math.nan))),
    "weight_decay": _not(st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0),
                                   st.just(math.nan))),
    "sample_scale": _not(st.one_of(st.floats(max_value=-1e-9), st.just(math.nan),
                                   st.just(math.inf))),
    "bn_sigma": _not(st.one_of(st.floats(max_value=-1e-9), st.just(math.nan))),
    "sampler": st.one_of(st.text(max_size=8).filter(lambda s: s not in ("shuffle", "random")),
                         st.integers(), st.none()),
    "sigma": st.one_of(st.text(max_size=8).filter(lambda s: s not in ("he", "empirical")),
                       st.integers(), st.none()),
    "backend": st.one_of(st.text(max_size=8).filter(lambda s: s not in ("auto", "fused", "torch")),
                         st.integers(), st.none()),
    "pool_size": st.one_of(st.integers(max_value=63), st.floats(allow_nan=True), st.text(max_size=2)),
    "generator": st.one_of(st.integers(), st.text(max_size=3)),
    "memory_limit": st.one_of(st.integers(max_value=-1), st.floats(allow_nan=True)),
}


@SETTINGS
@given(name=st.sampled_from(sorted(BAD_ARGS)), data_=st.data())
def test_bad_constructor_arguments_are_named(name, data_):
    value = data_.draw(BAD_ARGS[name], label=name)
    TRIED["constructor"] += 1
    kwargs = {"batch_size": 64} if name == "pool_size" else {}
    kwargs[name] = value
    with pytest.raises((TypeError, ValueError)) as err:
        RSO(tiny_net(), **kwargs)
    assert name in str(err.value)


@SETTINGS
@given(cycles=st.integers(1, 1000), batch_size=st.integers(1, 10**6),
       alpha=st.floats(0, 1), weight_decay=st.floats(0, 0.999),
       sampler=st.sampled_from(["shuffle", "random"]), sigma=st.sampled_from(["he", "empirical"]),
       calib_size=st.integers(1, 10**6))
def test_good_constructor_arguments_are_taken(**kw):
    TRIED["constructor (valid)"] += 1
    assert RSO(tiny_net(), **kw).hparams["cycles"] == kw["cycles"]


# -- training tensors -------------------------------------------------------------------------------
N = 40


def _mutate(kind: str, draw) -> tuple[torch.Tensor, torch.Tensor, dict, type, str]:
    """(x, y, RSO kwargs, expected error, text the message must hold)."""
    x, y = toy_data(N)
    kw = dict(batch_size=10)
    if kind == "ndim":
        shape = draw(st.sampled_from([(N, 64), (N, 8, 8), (N,), (N, 1, 1, 8, 8), (N, 1, 64, 1)]))
        x = x.reshape(-1)[:N] if shape == (N,) else x.reshape(shape)
        return x, y, kw, ValueError, "shape"
    if kind == "x dtype":
        dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.bool]))
        return x.to(dtype), y, kw, TypeError, "floating-point"
    if kind == "non-finite":
        bad = draw(st.lists(st.tuples(st.integers(0, N - 1), st.integers(0, 63),
                                      st.sampled_from([math.nan, math.inf, -math.inf])),
                            min_size=1, max_size=4))
        flat = x.view(N, -1)
        for i, j, v in bad:
            flat[i, j] = v
        return x, y, kw, ValueError, f"sample {min(i for i, _, _ in bad)}"
    if kind == "label dtype":
        dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bool]))
        return x, y.to(dtype), kw, ValueError, "integer dtype"
    if kind == "label range":
        i = draw(st.integers(0, N - 1))
        v = draw(st.one_of(st.integers(3, 10**6), st.integers(-10**6, -1)))
        y = y.clone()
        y[:i] = y[:i].clamp(0, 2)
        y[i] = v
        return x, y, kw, ValueError, f"label {v} at index {i}"
    if kind == "label shape":
        return x, y.view(N, 1), kw, ValueError, "1-D"
    if kind == "length":
        n = draw(st.integers(1, 2 * N).filter(lambda n: n != N))
        yy = y.repeat(2)[:n]
        return x, yy, kw, ValueError, "length mismatch"
    if kind == "empty":
        return x[:0], y[:0], kw, ValueError, "empty"
    if kind == "batch size":
        kw["batch_size"] = draw(st.integers(N + 1, 10**7))
        return x, y, kw, ValueError, f"batch_size={kw['batch_size']}"
    raise AssertionError(kind)


@SETTINGS
@given(kind=st.sampled_from(["ndim", "x dtype", "non-finite", "label dtype", "label range",
                             "label shape", "length", "empty", "batch size"]),
       backend=st.sampled_from(["torch", "auto"]), data_=st.data())
def test_bad_training_tensors_are_refused_before_anything_changes(kind, backend, data_):
    TRIED["tensors"] += 1
    x, y, kw, error, text = _mutate(kind, data_.draw)
    rso = RSO(tiny_net(), cycles=1, calib_size=20, backend=backend, **kw)
    before = _state(rso)
    with pytest.raises(error) as err:
        next(rso.run(x, y))
    assert text in str(err.value)
    assert _unchanged(rso, before)
    with pytest.raises(error):
        rso.check(x, y)
    assert _unchanged(rso, before)


@SETTINGS
@given(x_dtype=st.sampled_from([torch.float16, torch.float32, torch.float64]),
       y_dtype=st.sampled_from([torch.int64, torch.int32, torch.int16, torch.uint8]))
def test_other_float_and_integer_dtypes_are_accepted(x_dtype, y_dtype):
    TRIED["tensors (valid)"] += 1
    x, y = toy_data(N)
    rso = RSO(tiny_net(), cycles=1, batch_size=10, calib_size=20, backend="torch")
    stats = rso.sweep_unit(0, x.to(x_dtype), y.to(y_dtype), weights=2)
    assert math.isfinite(stats.mean_loss)


# -- model structures -------------------------------------------------------------------------------
class WithRootParam(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        return self.fc(x.flatten(1)) * self.scale


def _seq(*layers):
    return nn.Sequential(OrderedDict((f"m{i}", m) for i, m in enumerate(layers)))


# (builder, error type, text the message must hold); backend "torch" and "auto"
UNSWEEPABLE = {
    "layernorm": (lambda: _seq(nn.Conv2d(1, 2, 3), nn.LayerNorm([2, 6, 6]), nn.Flatten(),
                               nn.Linear(72, 3)), TypeError, "'m1' (LayerNorm)"),
    "embedding": (lambda: _seq(nn.Flatten(), nn.Linear(64, 3), nn.Embedding(3, 3)), TypeError,
                  "'m2' (Embedding)"),
    "grouped conv": (lambda: _seq(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3, groups=2),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3)),
                     TypeError, "groups=2"),
    "conv1d": (lambda: _seq(nn.Flatten(1, 2), nn.Conv1d(8, 2, 3), nn.Flatten(), nn.Linear(12, 3)),
               TypeError, "'m1' (Conv1d)"),
    "root parameter": (WithRootParam, TypeError, "'<root>' (WithRootParam)"),
    "no parameters": (lambda: _seq(nn.Flatten(), nn.Softmax(1)), TypeError, "no parameters"),
    "bn first": (lambda: _seq(nn.BatchNorm2d(1), nn.Flatten(), nn.Linear(64, 3)), TypeError,
                 "BatchNorm 'm0' runs before"),
    "3-D output": (lambda: _seq(nn.Conv2d(1, 3, 3), nn.Flatten(2)), ValueError,
                   "logits of shape"),
    "wrong input size": (lambda: _seq(nn.Flatten(), nn.Linear(65, 3)), ValueError,
                         "cannot run on training images of shape (1, 8, 8)"),
}

# sweepable by backend="torch" but not lowered by the planner: backend="fused" names the module
UNLOWERABLE = {
    "concatenation": (lambda: CatDag(), "the function torch.cat (fx node 'cat')"),
    "sigmoid": (lambda: _seq(nn.Conv2d(1, 2, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(72, 3)),
                "'m1' (Sigmoid)"),
    "dilated conv": (lambda: _seq(nn.Conv2d(1, 2, 3, dilation=2), nn.Flatten(), nn.Linear(32, 3)),
                     "'m0' (Conv2d)"),
    "ceil pool": (lambda: _seq(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2, ceil_mode=True), nn.Flatten(),
                               nn.Linear(18, 3)), "'m1' (MaxPool2d)"),
    "bn after flatten": (lambda: _seq(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.BatchNorm1d(72),
                                      nn.Linear(72, 3)), "'m2'"),
}


@SETTINGS
@given(name=st.sampled_from(sorted(UNSWEEPABLE)), backend=st.sampled_from(["torch", "auto", "fused"]))
def test_models_rso_cannot_sweep_are_refused_naming_the_module(name, backend):
    TRIED["models"] += 1
    build, error, text = UNSWEEPABLE[name]
    model = build()
    if name == "no parameters":
        with pytest.raises(error, match=text):
            RSO(model, backend=backend)
        return
    x, y = toy_data(N)
    rso = RSO(model, cycles=1, batch_size=10, calib_size=20, backend=backend)
    before = _state(rso)
    with pytest.raises(error) as err:
        next(rso.run(x, y))
    assert text in str(err.value)
    assert _unchanged(rso, before)


@SETTINGS
@given(name=st.sampled_from(sorted(UNLOWERABLE)))
def test_models_the_planner_cannot_lower_are_named_by_the_fused_backend(name):
    TRIED["models (fused)"] += 1
    build, text = UNLOWERABLE[name]
    x, y = toy_data(N)
    rso = RSO(build(), cycles=1, batch_size=10, calib_size=20, backend="fused")
    before = _state(rso)
    with pytest.raises(PlanError) as err:
        next(rso.run(x, y))
    assert text in str(err.value)
    assert _unchanged(rso, before)
    auto = RSO(build(), cycles=1, batch_size=10, calib_size=20, backend="auto")
    auto.sweep_unit(0, x, y, weights=1)            # "auto" falls back to the torch backend
    assert auto.backend == "torch"


# -- corrupted IDX files ----------------------------------------------------------------------------
SRC = data.embedded_root() / "MNIST" / "raw"
FILES = {"train-images-idx3-ubyte": 3, "train-labels-idx1-ubyte": 1,
         "t10k-images-idx3-ubyte": 3, "t10k-labels-idx1-ubyte": 1}


@pytest.fixture(scope="module")
def small_raw() -> dict[str, bytes]:
    """Uncompressed IDX bytes of 30 train / 20 test images and labels."""
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for name in FILES:
            n = 30 if name.startswith("train") else 20
            t = data.read_idx(SRC / f"{name}.gz")[:n]
            p = data.write_idx(Path(d) / name, t, compress=False)
            out[name] = p.read_bytes()
    return out


def _corrupt(raw: bytes, ndim: int, draw) -> bytes:
    kind = draw(st.sampled_from(["truncate", "header flip", "magic", "extra"]))
    if kind == "truncate":
        return raw[:draw(st.integers(0, len(raw) - 1))]
    if kind == "header flip":
        b = bytearray(raw)
        for i in draw(st.lists(st.integers(0, 4 + 4 * ndim - 1), min_size=1, max_size=3,
                               unique=True)):
            b[i] ^= draw(st.integers(1, 255))
        return bytes(b)
    if kind == "magic":
        return draw(st.binary(min_size=4, max_size=4).filter(
            lambda m: m != raw[:4])) + raw[4:]
    return raw + draw(st.binary(min_size=1, max_size=9))


@SETTINGS
@given(name=st.sampled_from(sorted(FILES)), gz=st.booleans(), data_=st.data())
def test_corrupted_idx_files_are_refused_naming_the_file(small_raw, name, gz, data_):
    TRIED["idx files"] += 1
    bad = _corrupt(small_raw[name], FILES[name], data_.draw)
    with tempfile.TemporaryDirectory() as d:
        raw = Path(d) / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for other, content in small_raw.items():
            if other != name:
                (raw / other).write_bytes(content)
        path = raw / (name + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(bad, mtime=0) if gz else bad)
        if gz and data_.draw(st.booleans(), label="also cut the gzip stream"):
            blob = path.read_bytes()
            path.write_bytes(blob[:data_.draw(st.integers(0, len(blob) - 1), label="cut")])
        with pytest.raises(ValueError) as err:
            data.read_idx(path)
        assert str(path) in str(err.value)
        with pytest.raises(ValueError) as err:
            data.load_mnist(d, train=name.startswith("train"))
        assert str(path) in str(err.value)
        assert sorted(p.name for p in raw.iterdir()) == sorted(
            [n for n in small_raw if n != name] + [path.name])


@SETTINGS
@given(split=st.sampled_from(["train", "t10k"]), cut=st.integers(1, 19),
       label=st.integers(10, 255), at=st.integers(0, 19))
def test_inconsistent_idx_pairs_are_refused(small_raw, split, cut, label, at):
    TRIED["idx pairs"] += 1
    with tempfile.TemporaryDirectory() as d:
        for name, content in small_raw.items():
            (Path(d) / name).write_bytes(content)
        images = data.read_idx(Path(d) / f"{split}-images-idx3-ubyte")
        labels = data.read_idx(Path(d) / f"{split}-labels-idx1-ubyte")
        data.write_idx(Path(d) / f"{split}-images-idx3-ubyte", images[:len(images) - cut])
        with pytest.raises(ValueError, match="count mismatch"):
            data.load_mnist(d, train=split == "train")
        data.write_idx(Path(d) / f"{split}-images-idx3-ubyte", images)
        labels[at] = label
        data.write_idx(Path(d) / f"{split}-labels-idx1-ubyte", labels)
        with pytest.raises(ValueError, match=f"label {label} at index {at}"):
            data.load_mnist(d, train=split == "train")


# -- CLI arguments ----------------------------------------------------------------------------------
def tiny_mnist_net(generator=None):
    net = tiny_net()
    net.fc = nn.Linear(4, 10, bias=False)
    return models.he_init_(net, generator)


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    """A 60/30-image MNIST root, the ``tiny`` model registered, and a non-run folder."""
    root = tmp_path_factory.mktemp("mnist")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 60), ("t10k", 30)):
        for kind in ("images-idx3", "labels-idx1"):
            t = data.read_idx(SRC / f"{split}-{kind}-ubyte.gz")[:n]
            data.write_idx(raw / f"{split}-{kind}-ubyte", t)
    other = tmp_path_factory.mktemp("not_a_run")
    (other / "notes.txt").write_text("not a run\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(models.MODELS, "tiny", tiny_mnist_net)
        yield root, other


BASE = ["--batch-size", "10", "--val-size", "10", "--calib-size", "20", "--cycles", "1",
        "--no-progress", "--model", "tiny"]
NOT_INT = st.one_of(st.text(alphabet="x.-e ", min_size=1, max_size=4),
                    st.floats(allow_nan=True).map(str).filter(lambda s: not s.isdigit()))


def _bad_cli(flag: str, draw, root: Path, other: Path) -> tuple[list[str], str]:
    """(argument list, texts one of which the error must hold)."""
    if flag in ("--batch-size", "--cycles", "--calib-size", "--train-size", "--threads"):
        v = draw(st.one_of(st.integers(max_value=0).map(str), NOT_INT))
        if flag == "--batch-size" and draw(st.booleans()):
            v = str(draw(st.integers(51, 10**9)))      # more than the 50 training images
            return [flag, v], (f"batch_size={v}",)
        return [flag, v], (flag,)
    if flag == "--val-size":
        v = draw(st.one_of(st.integers(max_value=-1).map(str), st.integers(60, 10**9).map(str),
                           NOT_INT))
        return [flag, v], ("val_size" if v.lstrip("-").isdigit() and int(v) >= 60 else flag,)
    if flag in ("--alpha", "--weight-decay", "--sample-scale"):
        lo, hi = {"--alpha": (0, 1), "--weight-decay": (0, 0.999), "--sample-scale": (0, 1e30)}[flag]
        v = draw(st.one_of(st.floats(max_value=-1e-6), st.floats(min_value=hi * 1.01 + 1e-6),
                           st.just(math.nan)).filter(lambda f: flag != "--sample-scale" or f < 0
                                                     or not math.isfinite(f)))
        name = flag[2:].replace("-", "_")
        return [flag, repr(v)], (name, flag)
    if flag == "--data-root":
        where = draw(st.sampled_from(["missing", "empty", "file"]))
        path = {"missing": other / "no" / "such", "empty": other, "file": other / "notes.txt"}[where]
        return [flag, str(path)], ("train-images-idx3-ubyte",)
    if flag in ("--sampler", "--sigma", "--backend", "--device", "--normalize", "--model"):
        return [flag, draw(st.text(alphabet="abcxyz_", min_size=1, max_size=6))], (flag,)
    raise AssertionError(flag)


@SETTINGS
@given(flag=st.sampled_from(["--batch-size", "--cycles", "--calib-size", "--train-size",
                             "--threads", "--val-size", "--alpha", "--weight-decay",
                             "--sample-scale", "--data-root", "--sampler", "--sigma", "--backend",
                             "--normalize", "--model"]),
       data_=st.data())
def test_bad_cli_arguments_are_named_and_create_nothing(cli_env, flag, data_):
    root, other = cli_env
    argv, text = _bad_cli(flag, data_.draw, root, other)
    TRIED["cli arguments"] += 1
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "run"
        args = ["train", "--data-root", str(root), "--out", str(out), *BASE, *argv]
        code, message = _run_cli(args, cwd=d)
        assert code == 2, message
        assert any(t in message for t in text), message
        assert os.listdir(d) == []                 # no run folder, nothing in the working dir
    assert sorted(os.listdir(other)) == ["notes.txt"]
    assert torch.get_num_threads() == threads


@SETTINGS
@given(where=st.sampled_from(["missing", "empty", "file", "half run"]),
       command=st.sampled_from(["train", "eval"]))
def test_resume_or_eval_of_a_non_run_folder_is_refused(cli_env, where, command):
    root, other = cli_env
    TRIED["cli --resume/eval"] += 1
    with tempfile.TemporaryDirectory() as d:
        run = Path(d) / "x"
        if where == "empty":
            run.mkdir()
        elif where == "file":
            run.write_text("hello")
        elif where == "half run":                  # config.json but not a word of JSON more
            run.mkdir()
            (run / cli.CONFIG).write_text("{")
        before = sorted(p.name for p in Path(d).rglob("*"))
        args = (["train", "--resume", str(run), "--no-progress"] if command == "train"
                else ["eval", str(run)])
        code, message = _run_cli(args, cwd=d)
        assert code != 0 and str(run) in message, message
        assert sorted(p.name for p in Path(d).rglob("*")) == before


def _run_cli(args: list[str], cwd: str) -> tuple[object, str]:
    """(exit code, stderr + SystemExit text) of ``cli.main(args)`` run in folder ``cwd``."""
    err = io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = cli.main(args)
                text = ""
            except SystemExit as e:
                code, text = (e.code, "") if isinstance(e.code, int) else (2, str(e.code))
    finally:
        os.chdir(old)
    return code, err.getvalue() + text
