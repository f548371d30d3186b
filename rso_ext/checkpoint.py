"""Checkpoint files: written atomically (temporary file, flush + fsync, rename) with a format tag and
a SHA-256 of the payload, so a torn or corrupted file is detected instead of half-loaded."""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

MAGIC = b"RSOCKPT1"
DIGEST = 32


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupted or of another format."""


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
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically, with magic bytes and a checksum."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    atomic_write_bytes(path, MAGIC + hashlib.sha256(payload).digest() + payload)


def load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """Load a checkpoint written by :func:`save`, verifying format and checksum."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    if len(raw) < len(MAGIC) + DIGEST or raw[:len(MAGIC)] != MAGIC:
        raise CheckpointError(f"{path} is not an rso_ext checkpoint (bad header; truncated or "
                              "another format)")
    digest, payload = raw[len(MAGIC):len(MAGIC) + DIGEST], raw[len(MAGIC) + DIGEST:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupted (checksum mismatch, "
                              f"{len(payload)} payload bytes)")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)
