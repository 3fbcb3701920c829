"""Where a search keeps its study: a journal file on one machine, PostgreSQL across many.

``make_storage`` turns what the user wrote (nothing, a ``.journal`` path, a database URL, or a
ready Optuna storage) into an Optuna storage:

* ``None`` -> ``<run_dir>/study.journal``: an append-only Optuna journal. Every finished trial is
  fsynced to it, so a search stopped by Ctrl-C, SIGKILL or a power cut resumes where it stopped
  (call the search again with the same ``run_dir`` and ``study_name``). A torn last line left by
  a writer killed mid-append is cut off when the file is opened again.
* ``"<path>.journal"`` -> the same at that path (several processes on one machine may share it).
* ``"postgresql://..."``, ``"postgresql+psycopg://..."``, ``"sqlite:///..."`` -> an Optuna
  ``RDBStorage`` with heartbeats: a worker that dies in the middle of a trial stops beating, the
  next worker to start a trial marks it ``FAIL`` and queues its parameters again
  (``RetryHeartbeatStaleTrialCallback``; the retry carries the ``failed_trial`` system attribute).

No home-made coordination: Optuna's storages do the locking; this module only chooses, checks
and explains.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoprune.errors import InvalidInputError, StorageError

if TYPE_CHECKING:
    import optuna

DEFAULT_JOURNAL_NAME = "study.journal"
_CREATE_ATTEMPTS = 6
JOURNAL_SUFFIX = ".journal"
#: URL schemes accepted by :func:`make_storage` (``postgres://`` is read as ``postgresql://``).
ALLOWED_SCHEMES: tuple[str, ...] = (
    "postgresql",
    "postgresql+psycopg",
    "postgresql+psycopg2",
    "sqlite",
)
_ALLOWED_TEXT = (
    "a path ending in .journal, or a URL starting with "
    + ", ".join(f"{s}://" for s in ALLOWED_SCHEMES)
)


def make_storage(
    storage: str | Path | optuna.storages.BaseStorage | None,
    run_dir: str | Path,
    heartbeat_interval_s: int = 10,
    grace_period_s: int | None = None,
    max_retry: int = 2,
    connect_timeout_s: int = 10,
) -> optuna.storages.BaseStorage:
    """The Optuna storage a search should use.

    Args:
        storage: ``None`` (journal file in ``run_dir``), a path ending in ``.journal``, a
            database URL (see ``ALLOWED_SCHEMES``), or an Optuna storage (returned unchanged).
        run_dir: run directory; holds the default journal.
        heartbeat_interval_s: databases only: seconds between a running trial's heartbeats.
        grace_period_s: databases only: seconds without a heartbeat after which a running trial
            is failed (Optuna's default, twice the interval, when ``None``).
        max_retry: databases (and :func:`fail_stale_trials` on a journal): how many times the
            parameters of a trial whose worker died are queued again.
        connect_timeout_s: PostgreSQL only: give up connecting after this many seconds.

    Raises:
        InvalidInputError: an unknown URL scheme, a path without ``.journal``, bad numbers.
        StorageError: the journal cannot be created, or the database cannot be reached (the
            message names host, port and database, never the password).
    """
    import optuna

    _check_int("heartbeat_interval_s", heartbeat_interval_s, minimum=1)
    if grace_period_s is not None:
        _check_int("grace_period_s", grace_period_s, minimum=1)
        if grace_period_s <= heartbeat_interval_s:
            raise InvalidInputError(
                f"grace_period_s={grace_period_s} must exceed heartbeat_interval_s="
                f"{heartbeat_interval_s}, or live workers would be failed between two beats"
            )
    _check_int("max_retry", max_retry, minimum=0)
    _check_int("connect_timeout_s", connect_timeout_s, minimum=1)

    if isinstance(storage, optuna.storages.BaseStorage):
        return storage
    if storage is None:
        return journal_storage(Path(run_dir) / DEFAULT_JOURNAL_NAME)
    if isinstance(storage, Path):
        return _journal_from_path(storage)
    if not isinstance(storage, str):
        raise InvalidInputError(
            f"storage must be None, a str/Path or an optuna storage, got "
            f"{type(storage).__name__}; allowed: {_ALLOWED_TEXT}"
        )
    text = storage.strip()
    if not text:
        raise InvalidInputError(f"storage is an empty string; allowed: {_ALLOWED_TEXT}")
    if "://" not in text:
        return _journal_from_path(Path(text))
    return _rdb_storage(
        text,
        heartbeat_interval_s=heartbeat_interval_s,
        grace_period_s=grace_period_s,
        max_retry=max_retry,
        connect_timeout_s=connect_timeout_s,
    )


def journal_storage(path: str | Path) -> optuna.storages.BaseStorage:
    """An Optuna journal storage at ``path`` (created with its directory if missing).

    A torn last record (a writer killed in the middle of an append) is cut off first, under the
    journal's own lock, so the next append does not glue onto it and make the file unreadable.
    """
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = JournalFileBackend(str(path))
    except OSError as e:
        raise StorageError(
            f"cannot create the search journal {path}: {e.strerror or e}; "
            "pass storage= a writable path ending in .journal"
        ) from None
    repair_journal(path)
    try:
        return JournalStorage(backend)
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        raise StorageError(
            f"search journal {path} is corrupt ({type(e).__name__}: {e}); move it away to "
            "start a new study"
        ) from None


def repair_journal(path: str | Path) -> int:
    """Cut a torn last record off an Optuna journal file. Returns the bytes removed.

    Runs under the journal's lock: writers hold it while appending, so a record without its
    newline seen under the lock was left by a writer that died, never one still writing.
    """
    from optuna.storages.journal import JournalFileSymlinkLock

    path = Path(path)
    if not path.exists():
        return 0
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        size = path.stat().st_size
        if size == 0:
            return 0
        with open(path, "rb+") as f:
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return 0
            # find the end of the last whole record
            keep = 0
            block = 1 << 16
            pos = size
            while pos > 0:
                start = max(0, pos - block)
                f.seek(start)
                chunk = f.read(pos - start)
                i = chunk.rfind(b"\n")
                if i >= 0:
                    keep = start + i + 1
                    break
                pos = start
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        return size - keep
    finally:
        lock.release()


def fail_stale_trials(
    study: optuna.Study, assume_single_worker: bool = False, max_retry: int = 2
) -> list[int]:
    """Fail RUNNING trials whose worker is gone; queue their parameters again. Returns the
    numbers of the trials failed.

    ``study.optimize`` does this by itself on a database storage; call it when you drive a study
    with ``ask``/``tell``:

    * database storage with heartbeats: trials whose heartbeat is older than the grace period
      (Optuna's ``fail_stale_trials`` with the storage's retry callback);
    * any storage with ``assume_single_worker=True`` (a journal resumed after a crash, when no
      other process works on the study): every RUNNING trial, retried up to ``max_retry`` times.
    """
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.storages._heartbeat import is_heartbeat_enabled
    from optuna.trial import TrialState

    _check_int("max_retry", max_retry, minimum=0)
    storage = study._storage
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return []
    if is_heartbeat_enabled(storage):
        before = {t.number for t in running}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        now_failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        return sorted(t.number for t in now_failed if t.number in before)
    if not assume_single_worker:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    failed: list[int] = []
    for t in running:
        try:
            ok = storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        if ok:
            failed.append(t.number)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                retry(study, storage.get_trial(t._trial_id))
    return failed


@contextlib.contextmanager
def trial_heartbeat(study: optuna.Study, trial: optuna.trial.BaseTrial) -> Iterator[None]:
    """Keep an ``ask``-ed trial's heartbeat alive while its body runs (``optimize`` does this
    itself). A no-op on storages without heartbeats.

    Example::

        trial = study.ask()
        with trial_heartbeat(study, trial):
            value = evaluate(trial)
        study.tell(trial, value)
    """
    from optuna.storages._heartbeat import BaseHeartbeat

    storage = study._storage
    # optuna's is_heartbeat_enabled, written so that the type checker sees the narrowing
    if not isinstance(storage, BaseHeartbeat) or (
            interval := storage.get_heartbeat_interval()) is None:
        yield
        return
    heartbeat: BaseHeartbeat = storage
    interval_s = float(interval)
    trial_id = trial._trial_id  # type: ignore[attr-defined]
    stop = threading.Event()

    def beat() -> None:
        while True:
            heartbeat.record_heartbeat(trial_id)
            if stop.wait(interval_s):
                return

    thread = threading.Thread(target=beat, name=f"autoprune-heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def describe_storage(storage: str | Path | optuna.storages.BaseStorage | None,
                     run_dir: str | Path | None = None) -> str:
    """Human-readable name of a storage for logs and reports, with any password hidden."""
    if storage is None:
        return str(Path(run_dir or ".") / DEFAULT_JOURNAL_NAME)
    if isinstance(storage, Path):
        return str(storage)
    if isinstance(storage, str):
        if "://" not in storage:
            return storage
        return _redact(storage)
    url = getattr(storage, "url", None)
    if isinstance(url, str):
        return _redact(url)
    inner = getattr(storage, "_backend", None)
    url = getattr(inner, "url", None)
    if isinstance(url, str):
        return _redact(url)
    backend = getattr(storage, "_backend", None)
    path = getattr(backend, "_file_path", None)
    if isinstance(path, str):
        return path
    return type(storage).__name__


# --- internals ---------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInputError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _journal_from_path(path: Path) -> optuna.storages.BaseStorage:
    if path.suffix != JOURNAL_SUFFIX:
        raise InvalidInputError(
            f"storage path {str(path)!r} does not end in {JOURNAL_SUFFIX}; allowed: "
            f"{_ALLOWED_TEXT} (for SQLite write sqlite:///{path})"
        )
    return journal_storage(path)


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        scheme = url.split("://", 1)[0]
        return f"{scheme}://<unparseable>"


def _where(url: Any) -> str:
    """'database 'db' at host:port (user 'u')' from a SQLAlchemy URL, without the password."""
    if url.get_backend_name() == "sqlite":
        return f"SQLite file {url.database!r}"
    host = url.host or url.query.get("host") or "localhost"
    if isinstance(host, tuple):
        host = ",".join(host)
    port = url.port or url.query.get("port") or 5432
    if isinstance(port, tuple):
        port = ",".join(port)
    user = f" as user {url.username!r}" if url.username else ""
    return f"database {url.database!r} at {host}:{port}{user}"


def _rdb_storage(
    text: str,
    heartbeat_interval_s: int,
    grace_period_s: int | None,
    max_retry: int,
    connect_timeout_s: int,
) -> optuna.storages.BaseStorage:
    import optuna
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    scheme = text.split("://", 1)[0].lower()
    if scheme == "postgres":  # Heroku-style spelling
        text = "postgresql" + text[len("postgres"):]
        scheme = "postgresql"
    if scheme not in ALLOWED_SCHEMES:
        raise InvalidInputError(
            f"unsupported storage URL scheme {scheme!r}; allowed: {_ALLOWED_TEXT}"
        )
    try:
        url = make_url(text)
    except sqlalchemy.exc.ArgumentError:
        raise InvalidInputError(
            f"storage URL {scheme}://... cannot be parsed; expected e.g. "
            "postgresql://user:password@host:5432/dbname or sqlite:///path/study.db"
        ) from None
    if scheme == "postgresql":
        # SQLAlchemy's default PostgreSQL driver; name psycopg 3 explicitly (it is what we install)
        url = url.set(drivername="postgresql+psycopg")
    engine_kwargs: dict[str, Any] = {}
    backend = url.get_backend_name()
    if backend == "postgresql":
        if not url.database:
            raise InvalidInputError(
                f"storage URL {_redact(text)} names no database; add /dbname after host:port"
            )
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": connect_timeout_s}}
    elif backend == "sqlite":
        if not url.database or url.database == ":memory:":
            raise InvalidInputError(
                f"storage URL {text!r} is an in-memory SQLite database, which no other process "
                "can see and which is lost on exit; use sqlite:///path/study.db or a .journal path"
            )
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    where = _where(url)
    password = url.password
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        try:
            for attempt in range(_CREATE_ATTEMPTS):
                try:
                    return optuna.storages.RDBStorage(
                        url.render_as_string(hide_password=False),
                        engine_kwargs=engine_kwargs,
                        heartbeat_interval=heartbeat_interval_s,
                        grace_period=grace_period_s,
                        heartbeat_stale_trial_callback=callback,
                    )
                except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as e:
                    # workers started together on an empty database race to create Optuna's
                    # tables ("duplicate key ... pg_type_typname_nsp_index", "already exists");
                    # the loser tries again and finds them made
                    text_e = str(e).lower()
                    racing = "duplicate key" in text_e or "already exists" in text_e
                    if not racing or attempt == _CREATE_ATTEMPTS - 1:
                        raise
                    time.sleep(random.uniform(0.05, 0.3) * (attempt + 1))
            raise AssertionError("unreachable")  # pragma: no cover
        except ImportError:
            driver = url.drivername
            raise StorageError(
                f"the database driver for {driver}:// is not installed; "
                "use postgresql:// (psycopg 3, installed with autoprune) or pip install "
                + ("psycopg2-binary" if "psycopg2" in driver else "psycopg[binary]")
            ) from None
        except sqlalchemy.exc.SQLAlchemyError as e:
            reason = str(getattr(e, "orig", None) or e).strip().splitlines()
            first = reason[0] if reason else type(e).__name__
            if password:
                first = first.replace(str(password), "***")
            raise StorageError(
                f"cannot open the search storage: {where} is not reachable or not usable "
                f"({first}); check that the server runs, the URL is right and the database "
                "exists"
            ) from None
