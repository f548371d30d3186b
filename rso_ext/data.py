"""MNIST-format data: IDX reading/writing, download, splits with training-set normalisation.

Imports only torch, numpy and the standard library (torchvision is never required).
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

__all__ = [
    "DATASETS", "DatasetInfo", "Splits", "read_idx", "write_idx", "find_raw_file", "load_mnist",
    "download", "load_splits", "from_dataset", "check_data", "embedded_root",
]

_GZIP_MAGIC = b"\x1f\x8b"
_IDX_DTYPES = {0x08: np.uint8}  # the only type code the MNIST-family files use


@dataclass(frozen=True)
class DatasetInfo:
    """Where a dataset lives: torchvision's folder name, its files, download mirrors and checksums."""

    folder: str
    files: dict[str, str]  # role -> file name (uncompressed); roles: train/test _images/_labels
    md5: dict[str, str]  # file name -> md5 of the UNCOMPRESSED file
    mirrors: tuple[str, ...]  # base URLs; a file is fetched from base + name + ".gz"
    num_classes: int = 10


_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        folder="MNIST",
        files=dict(_FILES),
        md5={
            "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
            "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
            "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
            "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
        },
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    ),
    "fashion-mnist": DatasetInfo(
        folder="FashionMNIST",
        files=dict(_FILES),
        md5={  # computed from Debian's dataset-fashion-mnist (6000 train / 1000 test labels per class)
            "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
            "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
            "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
        },
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    ),
}


def _info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset name={name!r}; choose one of {sorted(DATASETS)}") from None


def embedded_root() -> Path:
    """Folder of the embedded MNIST subset (10,000 train / 2,000 test images), usable as `root`."""
    return Path(__file__).resolve().parent / "datasets" / "mnist_small"


# ----------------------------------------------------------------------------------------- IDX
def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an IDX file (gzip-compressed or raw, detected by magic bytes) into a uint8 tensor."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path} (expected an MNIST-format IDX file, .gz or raw)")
    data = path.read_bytes()
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or not 1 <= data[3] <= 4:
        raise ValueError(
            f"{path}: not an IDX file; expected magic 00 00 <type> <ndim 1..4>, found bytes {data[:4].hex(' ')!r}"
        )
    if data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: unsupported IDX type code 0x{data[2]:02x} (supported: 0x08 uint8)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated header; expected {header} bytes, got {len(data)}")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64))
    actual = len(data) - header
    if actual < expected:
        raise ValueError(f"{path}: truncated; header shape {shape} needs {expected} payload bytes, got {actual}")
    if actual > expected:
        raise ValueError(
            f"{path}: {actual - expected} trailing extra bytes; header shape {shape} needs {expected}, got {actual}"
        )
    arr = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)
    return torch.from_numpy(arr.copy())


def write_idx(path: str | os.PathLike, tensor: torch.Tensor | np.ndarray, compress: bool | None = None) -> Path:
    """Write a uint8 tensor (1..4 dims) as IDX; gzip (level 9, mtime 0) if `compress` or the name ends in .gz."""
    path = Path(path)
    arr = np.asarray(tensor.cpu() if isinstance(tensor, torch.Tensor) else tensor)
    if arr.dtype != np.uint8 or not 1 <= arr.ndim <= 4:
        raise ValueError(f"write_idx({path}): need a uint8 array with 1..4 dims, got {arr.dtype} {arr.shape}")
    raw = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes() + arr.tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        raw = gzip.compress(raw, compresslevel=9, mtime=0)
    path.write_bytes(raw)
    return path


# ------------------------------------------------------------------------------------- locating
def find_raw_file(root: str | os.PathLike, name: str, filename: str) -> Path:
    """Find `filename` (with or without .gz) in <root>/<Folder>/raw/ or flat in <root>/."""
    info = _info(name)
    stem = filename[:-3] if filename.endswith(".gz") else filename
    root = Path(root)
    tried = [d / f for d in (root / info.folder / "raw", root) for f in (stem, stem + ".gz")]
    for p in tried:
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"{name} file {stem}[.gz] not found; tried: " + ", ".join(str(p) for p in tried)
        + ". Pass download=True (CLI: --download) to fetch it, or point root at the folder holding it."
    )


def load_mnist(
    root: str | os.PathLike | None = None, name: str = "mnist", train: bool = True, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split as (images uint8 [N,28,28], labels int64 [N]); root=None uses the embedded subset."""
    info = _info(name)
    if root is None:
        if name != "mnist":
            raise ValueError(
                f"the embedded subset is MNIST only; pass root= for name={name!r} "
                "(Debian's dataset-fashion-mnist installs to /usr/share/datasets/fashion-mnist)"
            )
        if download:
            raise ValueError("download=True needs a root folder (root=None means the embedded subset)")
        root = embedded_root()
    if download:
        _download(root, name)
    split = "train" if train else "test"
    img_path = find_raw_file(root, name, info.files[f"{split}_images"])
    lbl_path = find_raw_file(root, name, info.files[f"{split}_labels"])
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.dim() != 3:
        raise ValueError(f"{img_path}: images must be 3-D [N, H, W], got shape {tuple(images.shape)}")
    if labels.dim() != 1:
        raise ValueError(f"{lbl_path}: labels must be 1-D [N], got shape {tuple(labels.shape)}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"count mismatch: {img_path} has {images.shape[0]} images but {lbl_path} has {labels.shape[0]} labels"
        )
    bad = (labels >= info.num_classes).nonzero()
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"{lbl_path}: label {int(labels[i])} at index {i} is out of range 0..{info.num_classes - 1}"
        )
    return images, labels.long()


# ------------------------------------------------------------------------------------- download
def _md5_of_content(path: Path) -> str:
    """md5 of the file's content, decompressed if it is gzip."""
    with open(path, "rb") as f:
        gz = f.read(2) == _GZIP_MAGIC
    h = hashlib.md5()
    with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _valid(path: Path, md5: str) -> bool:
    try:
        return path.is_file() and _md5_of_content(path) == md5
    except (OSError, EOFError, zlib.error):
        return False


def download(
    root: str | os.PathLike, name: str = "mnist", base_urls: Sequence[str] | None = None, timeout: float = 30.0
) -> Path:
    """Fetch the four .gz files into <root>/<Folder>/raw/, md5-checked; returns that folder.

    Files already present and valid are skipped. Each file goes to a temp file in the same folder and is
    renamed only after its checksum passed; on any failure the next mirror is tried, and nothing partial
    is ever left behind.
    """
    info = _info(name)
    mirrors = list(base_urls) if base_urls is not None else list(info.mirrors)
    if not mirrors:
        raise ValueError("base_urls is empty; give at least one mirror URL")
    raw = Path(root) / info.folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for stem in info.files.values():
        want = info.md5[stem]
        dest = raw / (stem + ".gz")
        if _valid(dest, want) or _valid(raw / stem, want):
            continue
        failures = []
        for base in mirrors:
            url = base.rstrip("/") + "/" + stem + ".gz"
            err = _fetch(url, dest, want, timeout)
            if err is None:
                break
            failures.append(f"{url}: {err}")
        else:
            raise RuntimeError(f"could not download {dest.name} for {name}; every mirror failed:\n  "
                               + "\n  ".join(failures))
    return raw


_download = download  # load_mnist's `download` argument shadows the function name


def _fetch(url: str, dest: Path, md5: str, timeout: float) -> str | None:
    """Download url to dest via a temp file; return None on success or the reason it failed."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            got = 0
            for chunk in iter(lambda: resp.read(1 << 16), b""):
                out.write(chunk)
                got += len(chunk)
        if length is not None and got != int(length):
            return f"connection closed after {got} of {length} bytes"
        try:
            actual = _md5_of_content(Path(tmp))
        except (OSError, EOFError, zlib.error) as e:
            return f"corrupt download ({e})"
        if actual != md5:
            return f"md5 mismatch for {dest.name}: expected {md5}, got {actual}"
        os.replace(tmp, dest)
        return None
    except (OSError, http.client.HTTPException, ValueError) as e:  # URLError/HTTPError/timeouts are OSError
        return f"{type(e).__name__}: {e}"
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --------------------------------------------------------------------------------------- splits
@dataclass
class Splits:
    """Normalised float32 images [N,1,28,28] and int64 labels; mean/std are per-channel tensors [C]
    computed on train_x's images only (before normalisation) and applied to all three splits."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    name: str = "mnist"
    normalize: str = "mean"

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Apply this split's normalisation to images already scaled to [0,1], shape [N,C,H,W]."""
        x = x - self.mean.view(1, -1, 1, 1)
        return x / self.std.view(1, -1, 1, 1) if self.normalize == "meanstd" else x


_NORMALIZE = ("mean", "meanstd")


def load_splits(
    name: str = "mnist", root: str | os.PathLike | None = None, val_size: int = 0,
    normalize: str = "mean", seed: int = 0, download: bool = False,
) -> Splits:
    """Load train/val/test, scale to [0,1], subtract the training mean (and divide by std for "meanstd").

    The validation split is `val_size` training images drawn by a permutation seeded with `seed`;
    statistics come from the remaining training images only. Both parts keep the file order.
    """
    if normalize not in _NORMALIZE:
        raise ValueError(f"normalize={normalize!r} is not supported; choose one of {list(_NORMALIZE)}")
    train_img, train_y = load_mnist(root, name, train=True, download=download)
    test_img, test_y = load_mnist(root, name, train=False)
    n = train_img.shape[0]
    if not isinstance(val_size, int) or not 0 <= val_size < n:
        raise ValueError(f"val_size={val_size!r} must be an int in [0, {n}) (the training set has {n} images)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, tr_idx = perm[:val_size].sort().values, perm[val_size:].sort().values

    def scale(u8: torch.Tensor) -> torch.Tensor:
        return u8.unsqueeze(1).float().div_(255.0)

    train_x = scale(train_img[tr_idx])
    c = train_x.shape[1]
    mean = torch.stack([train_x[:, i].sum(dtype=torch.float64) / train_x[:, i].numel() for i in range(c)])
    std = torch.stack([
        (train_x[:, i] - float(mean[i])).pow_(2).sum(dtype=torch.float64).div(train_x[:, i].numel()).sqrt()
        for i in range(c)
    ])
    s = Splits(train_x, train_y[tr_idx], scale(train_img[val_idx]), train_y[val_idx], scale(test_img), test_y,
               mean.float(), std.float(), name=name, normalize=normalize)
    s.train_x, s.val_x, s.test_x = (s.transform(x) for x in (s.train_x, s.val_x, s.test_x))
    return s


# ------------------------------------------------------------------------------------- adapters
def _to_image(img: Any, index: int) -> torch.Tensor:
    if isinstance(img, torch.Tensor):
        t = img
    else:
        arr = np.asarray(img)  # PIL images and array-likes
        if arr.dtype == object:
            raise TypeError(f"item {index}: image of type {type(img).__name__} cannot be converted to a tensor")
        if arr.ndim == 3 and not isinstance(img, np.ndarray):  # PIL colour image: HWC -> CHW
            arr = arr.transpose(2, 0, 1)
        t = torch.from_numpy(np.ascontiguousarray(arr))
        if t.dim() == 2 and not isinstance(img, np.ndarray):  # PIL greyscale: add the channel axis
            t = t.unsqueeze(0)
    return t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()


def from_dataset(ds: Iterable, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a torch Dataset / DataLoader of (image, int label) pairs into (x float32 [N,...], y int64 [N]).

    uint8 images are scaled to [0,1]; PIL images become [C,H,W] like torchvision's ToTensor.
    """
    batched = isinstance(ds, torch.utils.data.DataLoader)
    if hasattr(ds, "__len__") and hasattr(ds, "__getitem__") and not batched:
        items: Iterable = (ds[i] for i in range(len(ds)))
    else:
        items = ds
    xs, ys, n = [], [], 0
    for i, item in enumerate(items):
        if limit is not None and n >= limit:
            break
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"item {i} of {type(ds).__name__} is {type(item).__name__}, "
                            "expected an (image, label) pair")
        img, lbl = item
        try:
            y = torch.as_tensor(lbl).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            y = None
        if y is None or y.dtype.is_floating_point or y.dtype == torch.bool or (not batched and len(y) != 1):
            raise TypeError(f"item {i} of {type(ds).__name__}: label {lbl!r} is not an integer class index")
        x = _to_image(img, i) if batched else _to_image(img, i).unsqueeze(0)
        y = y.long()
        xs.append(x)
        ys.append(y)
        n += len(y)
    if not xs:
        raise ValueError(f"from_dataset: {type(ds).__name__} yielded no items")
    x, y = torch.cat(xs), torch.cat(ys)
    return (x[:limit], y[:limit]) if limit is not None else (x, y)


def check_data(x: torch.Tensor, y: torch.Tensor, num_classes: int | None = None, name: str = "data") -> None:
    """Raise ValueError if x/y are not tensors of samples ([N, ...] and [N]), are empty, differ in
    length, y is not integer, labels are out of range, or x holds NaN/Inf."""
    for arg, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{name}: x must have a sample dimension and a feature dimension "
                         f"([N, ...]), got shape {tuple(x.shape)}")
    if y.dim() != 1:
        raise ValueError(f"{name}: labels y must be 1-D [N] class indices, got shape "
                         f"{tuple(y.shape)}")
    if len(x) == 0 or len(y) == 0:
        raise ValueError(f"{name}: empty (x has {len(x)} samples, y has {len(y)})")
    if len(x) != len(y):
        raise ValueError(f"{name}: length mismatch, x has {len(x)} samples but y has {len(y)} labels")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"{name}: labels y must have an integer dtype, got {y.dtype}")
    if x.dtype.is_floating_point or x.dtype.is_complex:
        bad = ~torch.isfinite(x.reshape(len(x), -1))
        count = int(bad.sum())
        if count:
            first = int(bad.any(1).nonzero()[0])
            raise ValueError(f"{name}: x holds {count} NaN/Inf values; the first is in sample {first}")
    out = (y < 0) if num_classes is None else (y < 0) | (y >= num_classes)
    idx = out.nonzero()
    if len(idx):
        i = int(idx[0])
        rng = ">= 0" if num_classes is None else f"0..{num_classes - 1}"
        raise ValueError(f"{name}: label {int(y[i])} at index {i} is out of range {rng}")
