"""Atomic file writes, safe reads, inter-process locks and the cache directory. Every file
autoprune writes goes through here.

A writer that is killed at any point leaves either the old file or the new one, whole:
the data goes to a temporary file in the same directory, is flushed and fsynced, then
renamed over the target (``os.replace`` is atomic on POSIX and Windows).

Several files that must change together (a latency table's CSV and its sidecar) are written
under ``file_lock``: an advisory ``flock`` on a lock file next to them, exclusive for writers,
shared for readers. The kernel drops the lock when its holder exits or is killed (SIGKILL
included), so a dead process never leaves it stuck.

``cache_dir()`` is where library calls put reusable files nobody asked for by path (latency
tables): ``$AUTOPRUNE_CACHE``, else ``$XDG_CACHE_HOME/autoprune``, else ``~/.cache/autoprune``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from autoprune.errors import CorruptFileError, StorageError

if sys.platform == "win32":  # pragma: no cover - Windows only
    import msvcrt
else:
    import fcntl

LOCK_NAME = ".lock"
#: seconds between attempts while waiting for a lock with a timeout
_LOCK_POLL_S = 0.005


def cache_dir() -> Path:
    """The directory for files autoprune keeps between runs without being given a path.

    ``$AUTOPRUNE_CACHE`` if set, else ``$XDG_CACHE_HOME/autoprune`` (an absolute
    ``XDG_CACHE_HOME`` only, as the XDG spec says), else ``~/.cache/autoprune``. Read at each
    call (never at import); the directory is not created here.
    """
    env = os.environ.get("AUTOPRUNE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "autoprune"
    return Path.home() / ".cache" / "autoprune"


@contextlib.contextmanager
def file_lock(path: str | Path, shared: bool = False,
              timeout_s: float | None = None) -> Iterator[int | None]:
    """Hold an advisory inter-process lock on the file ``path`` for the ``with`` block.

    ``shared=False`` (writers): exclusive; the file and its directory are created if missing.
    ``shared=True`` (readers): many readers at once, none while a writer holds it. A reader
    whose directory does not exist, or which may not create the lock file (a read-only copy
    of shipped tables), reads without a lock: no process with its permissions can write there.
    ``timeout_s``: give up after this many seconds with ``StorageError`` naming the file
    (default: wait). Yields the lock file's descriptor (opened read-write where allowed, else
    read-only), or None when reading without a lock.

    The lock is ``fcntl.flock`` (per open file, so it also orders threads that each enter
    ``file_lock``); the kernel releases it when the holder exits or is killed. Where
    ``fcntl`` is missing (Windows) ``msvcrt.locking`` is used and every lock is exclusive.
    """
    path = Path(path)
    fd = _open_lock_file(path, create_dir=not shared)
    if fd is None:
        yield None
        return
    try:
        _acquire(fd, path, shared, timeout_s)
        try:
            yield fd
        finally:
            _release(fd)
    finally:
        os.close(fd)


def _open_lock_file(path: Path, create_dir: bool) -> int | None:
    if create_dir:  # a writer: must get the lock (errors name the path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    if not path.parent.is_dir():
        return None
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
        try:
            return os.open(path, flags, 0o666)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT):
                raise
    return None


def _acquire(fd: int, path: Path, shared: bool, timeout_s: float | None) -> None:
    deadline = None if timeout_s is None else time.monotonic() + max(0.0, float(timeout_s))
    while True:
        if _try_lock(fd, shared, block=deadline is None):
            return
        if time.monotonic() >= deadline:  # type: ignore[operator]
            raise StorageError(
                f"{path}: another process has held this lock for more than {timeout_s} s; "
                "wait for it to finish (a killed holder releases the lock by itself)"
            )
        time.sleep(_LOCK_POLL_S)


def _try_lock(fd: int, shared: bool, block: bool) -> bool:
    if sys.platform == "win32":  # pragma: no cover - Windows only
        os.lseek(fd, 0, os.SEEK_SET)
        while True:
            try:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                return True
            except OSError:
                if not block:
                    return False
                time.sleep(_LOCK_POLL_S)
    op = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        fcntl.flock(fd, op if block else op | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _release(fd: int) -> None:
    if sys.platform == "win32":  # pragma: no cover - Windows only
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_UN)


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


def read_bytes(path: str | Path) -> bytes:
    """A file's bytes; a missing file raises ``CorruptFileError`` naming it."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CorruptFileError(f"{path}: file not found") from None


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
