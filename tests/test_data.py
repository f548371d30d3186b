"""Tests for rso_ext.data: IDX I/O, embedded subset, splits, validation, download (local server only)."""
from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from rso_ext import data as D

EMBEDDED_TRAIN_COUNTS = [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
EMBEDDED_TEST_COUNTS = [175, 234, 219, 207, 217, 179, 178, 205, 192, 194]
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def _real_mnist_root() -> Path | None:
    """The full MNIST named by RSO_EXT_MNIST_ROOT (README.md), if it is there."""
    env = os.environ.get("RSO_EXT_MNIST_ROOT")
    if not env:
        return None
    try:
        D.find_raw_file(Path(env), "mnist", "train-labels-idx1-ubyte")
    except FileNotFoundError:
        return None
    return Path(env)


def _write_set(root: Path, n_train: int = 12, n_test: int = 5, folder: bool = True) -> Path:
    """Write a tiny valid MNIST-format set; return the folder holding the files."""
    raw = root / "MNIST" / "raw" if folder else root
    raw.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    for split, n in (("train", n_train), ("t10k", n_test)):
        D.write_idx(raw / f"{split}-images-idx3-ubyte.gz", torch.randint(0, 256, (n, 28, 28), generator=g,
                                                                          dtype=torch.uint8))
        D.write_idx(raw / f"{split}-labels-idx1-ubyte.gz", (torch.arange(n) % 10).to(torch.uint8))
    return raw


# ----------------------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("shape", [(7,), (3, 4, 5), (2, 3, 2, 2)])
def test_idx_roundtrip(tmp_path, suffix, shape):
    t = torch.randint(0, 256, shape, dtype=torch.uint8)
    p = D.write_idx(tmp_path / f"x{suffix}", t)
    assert (p.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
    out = D.read_idx(p)
    assert out.dtype == torch.uint8 and out.shape == shape and torch.equal(out, t)


def test_idx_gzip_detected_by_magic_not_suffix(tmp_path):
    t = torch.arange(6, dtype=torch.uint8).reshape(2, 3)
    p = D.write_idx(tmp_path / "no_suffix", t, compress=True)
    assert torch.equal(D.read_idx(p), t)


def test_idx_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.gz"))):
        D.read_idx(tmp_path / "nope.gz")


def test_idx_truncated(tmp_path):
    p = D.write_idx(tmp_path / "t", torch.zeros(4, 5, dtype=torch.uint8))
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"t: truncated.*20 payload bytes, got 17"):
        D.read_idx(p)


def test_idx_truncated_gzip(tmp_path):
    p = D.write_idx(tmp_path / "t.gz", torch.randint(0, 256, (50, 50), dtype=torch.uint8))
    p.write_bytes(p.read_bytes()[:-30])
    with pytest.raises(ValueError, match="t.gz"):
        D.read_idx(p)


def test_idx_wrong_magic(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match=r"bad.*12 34 08 01"):
        D.read_idx(p)
    p.write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00\x00\x00\x00")  # float type code
    with pytest.raises(ValueError, match=r"bad.*0x0d"):
        D.read_idx(p)


def test_idx_extra_bytes(tmp_path):
    p = D.write_idx(tmp_path / "e", torch.zeros(3, dtype=torch.uint8))
    p.write_bytes(p.read_bytes() + b"xx")
    with pytest.raises(ValueError, match=r"e: 2 trailing extra bytes"):
        D.read_idx(p)


# ------------------------------------------------------------------------------ embedded / load
def test_embedded_subset_loads():
    x, y = D.load_mnist()
    assert x.shape == (10000, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert y.bincount(minlength=10).tolist() == EMBEDDED_TRAIN_COUNTS
    xt, yt = D.load_mnist(train=False)
    assert xt.shape == (2000, 28, 28) and yt.bincount(minlength=10).tolist() == EMBEDDED_TEST_COUNTS
    readme = (D.embedded_root() / "README.md").read_text()
    assert ", ".join(map(str, EMBEDDED_TRAIN_COUNTS)) in readme and "CC BY-SA 3.0" in readme


def test_find_raw_file_flat_layout_and_missing(tmp_path):
    _write_set(tmp_path, folder=False)
    x, y = D.load_mnist(tmp_path, "fashion-mnist")  # Debian's flat layout
    assert x.shape == (12, 28, 28) and y.tolist() == [i % 10 for i in range(12)]
    with pytest.raises(FileNotFoundError) as e:
        D.find_raw_file(tmp_path / "empty", "mnist", "train-images-idx3-ubyte")
    msg = str(e.value)
    assert str(tmp_path / "empty" / "MNIST" / "raw" / "train-images-idx3-ubyte.gz") in msg
    assert "download=True" in msg and "--download" in msg


def test_load_mnist_count_mismatch(tmp_path):
    raw = _write_set(tmp_path)
    D.write_idx(raw / "train-labels-idx1-ubyte.gz", torch.zeros(11, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz has 12 images.*train-labels-idx1-ubyte.gz "
                                         r"has 11 labels"):
        D.load_mnist(tmp_path)


def test_load_mnist_labels_out_of_range(tmp_path):
    raw = _write_set(tmp_path)
    y = torch.zeros(12, dtype=torch.uint8)
    y[7] = 10
    D.write_idx(raw / "train-labels-idx1-ubyte.gz", y)
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz: label 10 at index 7"):
        D.load_mnist(tmp_path)


def test_load_mnist_images_not_3d(tmp_path):
    raw = _write_set(tmp_path)
    D.write_idx(raw / "train-images-idx3-ubyte.gz", torch.zeros(12, 784, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz: images must be 3-D"):
        D.load_mnist(tmp_path)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="name='cifar'"):
        D.load_mnist(None, "cifar")


# ------------------------------------------------------------------------------------- splits
def test_load_splits_statistics_and_val():
    s = D.load_splits(val_size=1000, seed=3)
    assert s.train_x.shape == (9000, 1, 28, 28) and s.val_x.shape == (1000, 1, 28, 28)
    assert s.test_x.shape == (2000, 1, 28, 28) and s.train_x.dtype == torch.float32
    assert s.train_y.dtype == torch.int64 and s.name == "mnist"
    assert abs(float(s.train_x.mean())) < 1e-5
    assert 0.12 < float(s.mean) < 0.14 and 0.29 < float(s.std) < 0.32
    # val split disjoint from the training part and together they are the whole training set
    x, y = D.load_mnist()
    tr = {r.numpy().tobytes() for r in ((s.train_x + s.mean) * 255).round().to(torch.uint8).flatten(1)}
    va = {r.numpy().tobytes() for r in ((s.val_x + s.mean) * 255).round().to(torch.uint8).flatten(1)}
    assert not (tr & va) and len(tr) + len(va) == len({r.numpy().tobytes() for r in x.flatten(1)})
    assert sorted(s.train_y.tolist() + s.val_y.tolist()) == sorted(y.tolist())
    # statistics come from the training part only and are applied unchanged to val and test
    total = x.double().sum() / 255
    val_sum = (s.val_x.double() + float(s.mean)).sum()
    assert abs(float(s.mean) - float((total - val_sum) / (9000 * 784))) < 1e-6
    assert abs(float(s.mean) - float(total / x.numel())) > 1e-5
    assert torch.allclose(s.test_x, D.load_mnist(train=False)[0].unsqueeze(1).float() / 255 - s.mean)
    # seeded: same seed same split, other seed other split
    s2 = D.load_splits(val_size=1000, seed=3)
    assert torch.equal(s.val_x, s2.val_x) and torch.equal(s.val_y, s2.val_y)
    assert not torch.equal(D.load_splits(val_size=1000, seed=4).val_y, s.val_y)


def test_load_splits_meanstd():
    s = D.load_splits(normalize="meanstd")
    assert s.val_x.shape[0] == 0 and s.train_x.shape[0] == 10000
    assert abs(float(s.train_x.mean())) < 1e-5 and abs(float(s.train_x.std()) - 1) < 1e-3


def test_load_splits_bad_arguments():
    with pytest.raises(ValueError, match=r"normalize='zscore'.*'mean', 'meanstd'"):
        D.load_splits(normalize="zscore")
    with pytest.raises(ValueError, match=r"val_size=10000 .*10000 images"):
        D.load_splits(val_size=10000)
    with pytest.raises(ValueError, match=r"val_size=-1"):
        D.load_splits(val_size=-1)


# --------------------------------------------------------------------------------- real MNIST
@pytest.mark.skipif(_real_mnist_root() is None, reason="full MNIST not found (set RSO_EXT_MNIST_ROOT)")
def test_real_mnist_facts():
    root = _real_mnist_root()
    x, y = D.load_mnist(root)
    assert x.shape == (60000, 28, 28) and y.bincount(minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert D.load_mnist(root, train=False)[0].shape == (10000, 28, 28)
    s = D.load_splits(root=root, normalize="meanstd")
    assert round(float(s.mean), 4) == 0.1307 and round(float(s.std), 4) == 0.3081
    for stem, md5 in D.DATASETS["mnist"].md5.items():
        assert D._md5_of_content(D.find_raw_file(root, "mnist", stem)) == md5


# -------------------------------------------------------------------------- adapters / checks
def test_from_dataset_and_dataloader():
    imgs = torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8)
    ds = torch.utils.data.TensorDataset(imgs, torch.arange(10))
    x, y = D.from_dataset(ds)
    assert x.dtype == torch.float32 and x.shape == (10, 1, 28, 28) and torch.allclose(x * 255, imgs.float())
    assert y.dtype == torch.int64 and y.tolist() == list(range(10))
    x2, y2 = D.from_dataset(torch.utils.data.DataLoader(ds, batch_size=4), limit=7)
    assert torch.equal(x2, x[:7]) and torch.equal(y2, y[:7])
    xa, _ = D.from_dataset([(np.zeros((28, 28), np.float32), 3)] * 2)
    assert xa.shape == (2, 28, 28)


def test_from_dataset_bad_item():
    with pytest.raises(TypeError, match="item 1"):
        D.from_dataset([(torch.zeros(2), 1), torch.zeros(2)])
    with pytest.raises(TypeError, match=r"item 0 .*label 'cat'"):
        D.from_dataset([(torch.zeros(2), "cat")])


def test_from_dataset_torchvision(tmp_path):
    tv = pytest.importorskip("torchvision")
    _write_set(tmp_path)
    x, y = D.from_dataset(tv.datasets.MNIST(str(tmp_path), train=True, download=False))
    assert x.shape == (12, 1, 28, 28) and y.tolist() == D.load_mnist(tmp_path)[1].tolist()


def test_check_data():
    x, y = torch.zeros(5, 1, 2, 2), torch.arange(5)
    D.check_data(x, y, num_classes=10)
    bad = x.clone()
    bad[3, 0, 1, 1] = float("nan")
    bad[4, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"train: x holds 2 NaN/Inf.*sample 3"):
        D.check_data(bad, y, name="train")
    with pytest.raises(ValueError, match=r"val: length mismatch.*5 samples.*4 labels"):
        D.check_data(x, y[:4], name="val")
    with pytest.raises(ValueError, match=r"data: labels y must have an integer dtype"):
        D.check_data(x, y.float())
    with pytest.raises(ValueError, match=r"test: label 4 at index 4 is out of range 0..3"):
        D.check_data(x, y, num_classes=4, name="test")
    with pytest.raises(ValueError, match=r"label -1 at index 0"):
        D.check_data(x, y - 1)
    with pytest.raises(ValueError, match=r"data: empty"):
        D.check_data(x[:0], y[:0])


# ------------------------------------------------------------------------------------ download
class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    hits: list[str] = []
    drop: set[str] = set()

    def do_GET(self):  # noqa: N802
        self.hits.append(self.path)
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in self.drop:  # send half the body, then close the connection
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """A local HTTP server; returns (base_url, files, hits, drop, md5 table)."""
    src = _write_set(tmp_path / "src")
    handler = type("H", (_Handler,), {"files": {}, "hits": [], "drop": set()})
    md5 = {}
    for p in src.iterdir():
        handler.files["/a/" + p.name] = handler.files["/b/" + p.name] = p.read_bytes()
        md5[p.name[:-3]] = hashlib.md5(gzip.decompress(p.read_bytes())).hexdigest()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.timeout = 2
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield base, handler, md5
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def table(monkeypatch, server):
    base, handler, md5 = server
    info = D.DatasetInfo("MNIST", dict(D.DATASETS["mnist"].files), md5, (base + "/a/",))
    monkeypatch.setitem(D.DATASETS, "tiny", info)
    return base, handler


def _raw_listing(root: Path) -> list[str]:
    raw = root / "MNIST" / "raw"
    return sorted(os.listdir(raw)) if raw.exists() else []


def test_download_success_and_skip(tmp_path, table):
    base, h = table
    raw = D.download(tmp_path / "dl", "tiny", timeout=5)
    assert raw == tmp_path / "dl" / "MNIST" / "raw" and len(_raw_listing(tmp_path / "dl")) == 4
    x, y = D.load_mnist(tmp_path / "dl", "tiny")
    assert x.shape == (12, 28, 28)
    n = len(h.hits)
    D.download(tmp_path / "dl", "tiny", timeout=5)  # all present and valid: nothing fetched
    assert len(h.hits) == n == 4
    x2, _ = D.load_mnist(tmp_path / "dl", "tiny", download=True)
    assert torch.equal(x, x2) and len(h.hits) == 4


def test_download_first_mirror_404(tmp_path, table):
    base, h = table
    D.download(tmp_path / "dl", "tiny", base_urls=[base + "/missing/", base + "/b/"], timeout=5)
    assert len(_raw_listing(tmp_path / "dl")) == 4
    assert sum(p.startswith("/missing/") for p in h.hits) == 4 and sum(p.startswith("/b/") for p in h.hits) == 4


def test_download_corrupted_leaves_nothing(tmp_path, table):
    base, h = table
    key = "/a/train-labels-idx1-ubyte.gz"
    h.files[key] = gzip.compress(gzip.decompress(h.files[key])[:-1] + b"\x09")
    want = D.DATASETS["tiny"].md5["train-labels-idx1-ubyte"]
    got = hashlib.md5(gzip.decompress(h.files[key])).hexdigest()
    with pytest.raises(RuntimeError, match=rf"train-labels-idx1-ubyte.*expected {want}, got {got}"):
        D.download(tmp_path / "dl", "tiny", timeout=5)
    assert _raw_listing(tmp_path / "dl") == ["train-images-idx3-ubyte.gz"]  # fetched before; no temp files


def test_download_dropped_connection_leaves_nothing(tmp_path, table):
    base, h = table
    h.drop.add("/a/train-images-idx3-ubyte.gz")
    with pytest.raises(RuntimeError, match="train-images-idx3-ubyte.gz"):
        D.download(tmp_path / "dl", "tiny", timeout=5)
    assert _raw_listing(tmp_path / "dl") == []
    D.download(tmp_path / "dl", "tiny", base_urls=[base + "/a/", base + "/b/"], timeout=5)  # next mirror
    assert len(_raw_listing(tmp_path / "dl")) == 4


def test_download_replaces_invalid_existing_file(tmp_path, table):
    raw = tmp_path / "dl" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    D.download(tmp_path / "dl", "tiny", timeout=5)
    assert D.load_mnist(tmp_path / "dl", "tiny", train=False)[1].shape == (5,)


def test_download_interrupted_leaves_nothing(tmp_path, table, monkeypatch):
    def interrupt(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(D, "_md5_of_content", interrupt)
    with pytest.raises(KeyboardInterrupt):
        D.download(tmp_path / "dl", "tiny", timeout=5)
    assert _raw_listing(tmp_path / "dl") == []
