"""Checkpoint files: written atomically (temporary file, flush + fsync, rename) with a format tag and
a SHA-256 of the payload, so a torn or corrupted file is detected instead of half-loaded.

:func:`save` keeps the previous good checkpoint next to the new one (``checkpoint.pt`` ->
``checkpoint.prev.pt``, by an atomic rename of a hard link, so at every moment both names hold a
whole file); :func:`load_latest` falls back to it when the newest one is missing or bad.
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

MAGIC_PREFIX = b"RSOCKPT"
FORMAT_VERSION = 1
MAGIC = MAGIC_PREFIX + str(FORMAT_VERSION).encode()
DIGEST = 32


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupted or of another format."""


class CheckpointWarning(UserWarning):
    """The newest checkpoint was bad and the previous one was used instead."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def previous_path(path: str | os.PathLike) -> Path:
    """Where :func:`save` keeps the checkpoint that ``path`` replaced: ``name.prev.ext``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _payload(path: Path) -> bytes:
    """The verified payload of checkpoint ``path`` (raises :class:`CheckpointError`)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e})") from None
    head = raw[:len(MAGIC)]
    if head != MAGIC and head.startswith(MAGIC_PREFIX) and len(head) == len(MAGIC):
        raise CheckpointError(f"{path} is an rso_ext checkpoint of format version "
                              f"{head[len(MAGIC_PREFIX):].decode(errors='replace')!r}; this "
                              f"version reads format {FORMAT_VERSION}")
    if len(raw) < len(MAGIC) + DIGEST or head != MAGIC:
        raise CheckpointError(f"{path} is not an rso_ext checkpoint (bad header; truncated or "
                              f"another format, {len(raw)} bytes)")
    digest, payload = raw[len(MAGIC):len(MAGIC) + DIGEST], raw[len(MAGIC) + DIGEST:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupted (checksum mismatch, "
                              f"{len(payload)} payload bytes; truncated or overwritten)")
    return payload


def verify(path: str | os.PathLike) -> None:
    """Check format and checksum of checkpoint ``path`` without unpickling it."""
    _payload(Path(path))


def save(obj: Any, path: str | os.PathLike, keep_previous: bool = True) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically, with magic bytes and a checksum.

    With ``keep_previous`` a good checkpoint already at ``path`` first becomes
    :func:`previous_path` (a bad one is not kept, so it never replaces a good previous one)."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    if keep_previous and path.exists():
        try:
            verify(path)
        except CheckpointError:
            pass
        else:
            _keep_as_previous(path)
    atomic_write_bytes(path, MAGIC + hashlib.sha256(payload).digest() + payload)


def _keep_as_previous(path: Path) -> None:
    """Atomically make ``previous_path(path)`` a copy of ``path``; ``path`` stays in place."""
    prev = previous_path(path)
    tmp = path.with_name(f".{prev.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)                       # same inode: no copy, no window without a file
    except OSError:                              # no hard links on this filesystem: copy
        atomic_write_bytes(prev, path.read_bytes())
        return
    try:
        os.replace(tmp, prev)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """Load a checkpoint written by :func:`save`, verifying format and checksum."""
    path = Path(path)
    payload = _payload(path)
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)
    except Exception as e:                      # checksum good but unreadable: another torch?
        raise CheckpointError(f"checkpoint {path} cannot be unpickled ({type(e).__name__}: "
                              f"{e})") from None


def load_latest(path: str | os.PathLike, map_location: Any = "cpu") -> Optional[tuple[Any, Path]]:
    """Load the newest good checkpoint: ``path`` or else :func:`previous_path` of it.

    Returns ``(object, file it came from)``, or ``None`` when neither file exists. Falling back
    to the previous file issues a :class:`CheckpointWarning` naming the bad file and why; when
    both exist and neither is good, raises a :class:`CheckpointError` naming both."""
    path = Path(path)
    prev = previous_path(path)
    if not path.exists() and not prev.exists():
        return None
    try:
        return load(path, map_location), path
    except CheckpointError as e:
        first = e
    if not prev.exists():
        raise first
    try:
        obj = load(prev, map_location)
    except CheckpointError as e:
        raise CheckpointError(f"no good checkpoint: {first}; and the previous one: {e}") from None
    warnings.warn(f"{first}; using the previous checkpoint {prev} instead", CheckpointWarning,
                  stacklevel=2)
    return obj, prev
