"""Atomic file writes and safe reads. Every file autoprune writes goes through here.

A writer that is killed at any point leaves either the old file or the new one, whole:
the data goes to a temporary file in the same directory, is flushed and fsynced, then
renamed over the target (``os.replace`` is atomic on POSIX and Windows).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from autoprune.errors import CorruptFileError


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_text(path: str | Path) -> str:
    """A UTF-8 text file; missing or undecodable raises ``CorruptFileError`` naming it."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CorruptFileError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise CorruptFileError(f"{path}: not UTF-8 text ({e})") from None


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a missing or corrupt file raises ``CorruptFileError`` naming it."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temp file then rename. Only tensors/plain containers should be saved
    (they load back with ``torch.load(weights_only=True)``)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)``: never runs code from the file."""
    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CorruptFileError(f"{path}: file not found") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        raise CorruptFileError(f"{path}: cannot load as weights ({type(e).__name__}: {e})") from None
