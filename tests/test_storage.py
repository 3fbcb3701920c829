"""make_storage: journal round trip and resume, torn-journal repair, bad URLs, unreachable
databases, stale-trial handling for ask/tell users (SQLite here; PostgreSQL in
test_distributed.py)."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import optuna
import pytest

from autoprune.errors import InvalidInputError, StorageError
from autoprune.storage import (
    describe_storage,
    fail_stale_trials,
    make_storage,
    repair_journal,
    trial_heartbeat,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -3.0, 3.0)
    return (x - 1.0) ** 2


def test_default_is_a_resumable_journal_in_run_dir(tmp_path: Path) -> None:
    storage = make_storage(None, tmp_path / "run")
    assert (tmp_path / "run" / "study.journal").exists()
    study = optuna.create_study(study_name="s", storage=storage, load_if_exists=True,
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(_objective, n_trials=5)
    first = [(t.number, t.params["x"], t.value) for t in study.trials]

    # a new process would do exactly this: open the same run_dir, load the study, go on
    again = optuna.load_study(study_name="s", storage=make_storage(None, tmp_path / "run"))
    assert [(t.number, t.params["x"], t.value) for t in again.trials] == first
    again.optimize(_objective, n_trials=5)
    numbers = [t.number for t in again.trials]
    assert numbers == list(range(10))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in again.trials)


def test_journal_path_and_existing_storage_pass_through(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "my.journal"
    s1 = make_storage(str(path), tmp_path)
    assert path.exists()
    s2 = make_storage(path, tmp_path)
    assert type(s1) is type(s2)
    mem = optuna.storages.InMemoryStorage()
    assert make_storage(mem, tmp_path) is mem
    assert describe_storage(str(path)) == str(path)
    assert describe_storage(None, tmp_path) == str(tmp_path / "study.journal")


def test_torn_last_record_is_cut_and_study_stays_usable(tmp_path: Path) -> None:
    path = tmp_path / "study.journal"
    study = optuna.create_study(study_name="s", storage=make_storage(path, tmp_path),
                                sampler=optuna.samplers.RandomSampler(seed=1))
    study.optimize(_objective, n_trials=3)
    whole = path.read_bytes()
    # a writer killed in the middle of an append leaves half a JSON record, no newline
    path.write_bytes(whole + b'{"op_code": 4, "worker_id": "dead", "trial_id": 0, "val')
    again = optuna.load_study(study_name="s", storage=make_storage(path, tmp_path))
    assert path.read_bytes() == whole
    again.optimize(_objective, n_trials=2)
    third = optuna.load_study(study_name="s", storage=make_storage(path, tmp_path))
    assert [t.number for t in third.trials] == [0, 1, 2, 3, 4]
    assert repair_journal(path) == 0


@pytest.mark.parametrize(
    "url,scheme",
    [("mysql://u:p@h/db", "mysql"), ("redis://localhost:6379", "redis"),
     ("http://example.com/study", "http"), ("mongodb://h/db", "mongodb")],
)
def test_unknown_url_scheme_names_scheme_and_allowed(tmp_path: Path, url: str, scheme: str) -> None:
    with pytest.raises(InvalidInputError) as e:
        make_storage(url, tmp_path)
    msg = str(e.value)
    assert repr(scheme) in msg and "postgresql://" in msg and "sqlite://" in msg and ".journal" in msg
    assert "p@h" not in msg


@pytest.mark.parametrize("bad", ["study.db", "runs/optuna", "", "   "])
def test_path_without_journal_suffix_is_rejected(tmp_path: Path, bad: str) -> None:
    with pytest.raises(InvalidInputError, match=r"\.journal"):
        make_storage(bad, tmp_path)


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="in-memory SQLite"):
        make_storage("sqlite:///:memory:", tmp_path)
    with pytest.raises(InvalidInputError, match="names no database"):
        make_storage("postgresql://u@localhost:5432", tmp_path)
    with pytest.raises(InvalidInputError, match="heartbeat_interval_s must be an integer >= 1"):
        make_storage(None, tmp_path, heartbeat_interval_s=0)
    with pytest.raises(InvalidInputError, match="grace_period_s=5 must exceed"):
        make_storage(None, tmp_path, heartbeat_interval_s=10, grace_period_s=5)
    with pytest.raises(InvalidInputError, match="max_retry"):
        make_storage(None, tmp_path, max_retry=-1)
    with pytest.raises(InvalidInputError, match="got int"):
        make_storage(42, tmp_path)  # type: ignore[arg-type]


def test_unreachable_database_names_host_port_not_password(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(StorageError) as e:
        make_storage("postgresql://alice:s3cret-pw@127.0.0.1:1/studies", tmp_path,
                     connect_timeout_s=3)
    msg = str(e.value)
    assert "127.0.0.1:1" in msg and "'studies'" in msg and "alice" in msg
    assert "s3cret-pw" not in msg
    assert time.monotonic() - t0 < 30
    assert "s3cret-pw" not in describe_storage("postgresql://alice:s3cret-pw@h:5/db")


def test_missing_driver_says_what_to_install(tmp_path: Path) -> None:
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        with pytest.raises(StorageError, match="psycopg2-binary"):
            make_storage("postgresql+psycopg2://u@127.0.0.1:1/db", tmp_path)
    else:  # pragma: no cover - psycopg2 is not a dependency
        pytest.skip("psycopg2 is installed here")


def test_sqlite_storage_has_heartbeats_and_retries(tmp_path: Path) -> None:
    storage = make_storage(f"sqlite:///{tmp_path / 'x' / 'study.db'}", tmp_path,
                           heartbeat_interval_s=1, grace_period_s=2, max_retry=1)
    assert isinstance(storage, optuna.storages.RDBStorage)
    assert storage.get_heartbeat_interval() == 1
    study = optuna.create_study(study_name="hb", storage=storage)

    # ask/tell user: one trial kept alive by trial_heartbeat, one abandoned (worker "died")
    alive = study.ask()
    alive.suggest_float("x", 0, 1)
    dead = study.ask()
    x_dead = dead.suggest_float("x", 0, 1)
    storage.record_heartbeat(dead._trial_id)
    with trial_heartbeat(study, alive):
        time.sleep(3.2)
        failed = fail_stale_trials(study)
    assert failed == [dead.number]
    study.tell(alive, 0.5)
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states[alive.number] == optuna.trial.TrialState.COMPLETE
    assert states[dead.number] == optuna.trial.TrialState.FAIL
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    assert len(waiting) == 1
    assert waiting[0].params == {"x": x_dead}
    assert waiting[0].system_attrs["failed_trial"] == dead.number


def test_journal_resume_after_crash_fails_and_retries_orphans(tmp_path: Path) -> None:
    storage = make_storage(None, tmp_path)
    study = optuna.create_study(study_name="s", storage=storage)
    study.optimize(_objective, n_trials=2)
    orphan = study.ask()
    x = orphan.suggest_float("x", -3.0, 3.0)
    # the process dies here; a new one opens the journal
    again = optuna.load_study(study_name="s", storage=make_storage(None, tmp_path))
    assert fail_stale_trials(again) == []  # journals have no heartbeat: not without the flag
    assert fail_stale_trials(again, assume_single_worker=True) == [orphan.number]
    again.optimize(_objective, n_trials=1)  # runs the queued retry first
    retried = again.trials[-1]
    assert retried.state == optuna.trial.TrialState.COMPLETE
    assert retried.params == {"x": x}
    assert retried.system_attrs["failed_trial"] == orphan.number
    assert again.trials[orphan.number].state == optuna.trial.TrialState.FAIL
