"""Distributed search on a real PostgreSQL server (started here; no SQLite stand-in).

Three worker processes share one study through ``autoprune.storage.make_storage``; one is
killed with SIGKILL in the middle of a trial. The study must still reach its trial count, every
completed trial must be recorded exactly once, the killed trial must be failed by the heartbeat
machinery and its parameters retried, and the Pareto front read from the database must equal the
one a single process computes from the same completed trials.

The workers run a cheap two-objective function of three keep ratios (latency proxy to minimise,
accuracy proxy to maximise) so the test measures the coordination, not profiling.
This file is also the worker program: ``python tests/test_distributed.py worker ...``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
N_COMPLETE = 30  # after the kill the survivors still need >= 7 s, the heartbeat grace is 3 s
N_WORKERS = 3
TRIAL_S = 0.5
HEARTBEAT_S = 1
GRACE_S = 3


# --- the worker program -------------------------------------------------------------------


def _values(params: dict[str, float]) -> tuple[float, float]:
    """Deterministic (latency_ms, accuracy) of a 'plan' of three keep ratios."""
    r = [params["r0"], params["r1"], params["r2"]]
    latency_ms = 1.0 + 4.0 * r[0] + 2.0 * r[1] + 1.0 * r[2]
    accuracy = 1.0 - 0.5 * (1 - r[0]) ** 2 - 0.3 * (1 - r[1]) ** 2 - 0.6 * (1 - r[2]) ** 2
    return latency_ms, accuracy


def _worker(url: str, study_name: str, marker_dir: str, role: str, seed: int) -> None:
    import optuna

    from autoprune.storage import make_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore")
    markers = Path(marker_dir)
    storage = make_storage(url, markers, heartbeat_interval_s=HEARTBEAT_S, grace_period_s=GRACE_S,
                           max_retry=2)
    study = optuna.load_study(study_name=study_name, storage=storage,
                              sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=6))
    pid = os.getpid()

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        params = {f"r{i}": trial.suggest_float(f"r{i}", 0.1, 1.0) for i in range(3)}
        (markers / f"start-{trial.number}-{pid}").write_text(json.dumps(params))
        # the victim hangs in its first trial until the test kills it
        time.sleep(600.0 if role == "victim" else TRIAL_S)
        return _values(params)

    def record_done(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            # O_EXCL: a trial finished twice would raise here and fail the worker
            fd = os.open(markers / f"done-{trial.number}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(pid).encode())
            os.close(fd)

    stop = optuna.study.MaxTrialsCallback(N_COMPLETE, states=(optuna.trial.TrialState.COMPLETE,))
    study.optimize(objective, callbacks=[record_done, stop])


# --- the test -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres():
    sys.path.insert(0, str(HERE))
    from pg import PostgresUnavailable, start_postgres

    try:
        server = start_postgres()
    except PostgresUnavailable as e:  # pragma: no cover - both are available in CI
        pytest.skip(str(e))
    try:
        yield server
    finally:
        server.stop()


def _spawn(url: str, study: str, markers: Path, role: str, seed: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "worker", url, study, str(markers), role,
         str(seed)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def _pareto(points: dict[int, tuple[float, float]]) -> set[int]:
    """Trial numbers not dominated (min latency, max accuracy) — plain single-process code."""
    front = set()
    for i, (lat_i, acc_i) in points.items():
        dominated = any(
            lat_j <= lat_i and acc_j >= acc_i and (lat_j < lat_i or acc_j > acc_i)
            for j, (lat_j, acc_j) in points.items() if j != i
        )
        if not dominated:
            front.add(i)
    return front


@pytest.mark.postgres
@pytest.mark.timeout(240)
def test_three_workers_survive_a_sigkill_mid_trial(postgres, tmp_path: Path) -> None:
    import optuna

    from autoprune.storage import make_storage

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    url = postgres.create_database("dist_sigkill")
    markers = tmp_path / "markers"
    markers.mkdir()
    storage = make_storage(url, tmp_path, heartbeat_interval_s=HEARTBEAT_S, grace_period_s=GRACE_S)
    optuna.create_study(study_name="s", storage=storage, directions=["minimize", "maximize"])

    victim = _spawn(url, "s", markers, "victim", seed=0)
    deadline = time.monotonic() + 90
    while not list(markers.glob(f"start-*-{victim.pid}")):
        assert victim.poll() is None, victim.stdout.read().decode()
        assert time.monotonic() < deadline, "victim never started a trial"
        time.sleep(0.05)
    workers = [_spawn(url, "s", markers, "worker", seed=s) for s in (1, 2)]
    # let the survivors get going, then kill the victim in the middle of its trial
    while len(list(markers.glob("done-*"))) < 2:
        assert all(w.poll() is None for w in workers), [w.stdout.read().decode() for w in workers]
        assert time.monotonic() < deadline, "workers made no progress"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    for w in workers:
        out = w.communicate(timeout=180)[0].decode()
        assert w.returncode == 0, out

    study = optuna.load_study(study_name="s", storage=make_storage(url, tmp_path))
    trials = study.get_trials(deepcopy=False)
    TS = optuna.trial.TrialState
    complete = [t for t in trials if t.state == TS.COMPLETE]

    # the study reached its trial count (concurrent workers may overshoot by one each)
    assert N_COMPLETE <= len(complete) <= N_COMPLETE + N_WORKERS - 1
    assert not [t for t in trials if t.state in (TS.RUNNING, TS.WAITING)]

    # every completed trial exactly once: unique numbers, and the set the workers saw finish
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    done = {int(p.name.split("-")[1]) for p in markers.glob("done-*")}
    assert {t.number for t in complete} == done
    assert all(t.values == list(_values(t.params)) for t in complete)

    # the killed trial was failed by the heartbeat machinery and its plan was retried
    (killed_marker,) = markers.glob(f"start-*-{victim.pid}")
    killed = int(killed_marker.name.split("-")[1])
    killed_params = json.loads(killed_marker.read_text())
    assert study.trials[killed].state == TS.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1
    assert retries[0].state == TS.COMPLETE
    assert retries[0].params == pytest.approx(killed_params)
    failed = [t for t in trials if t.state == TS.FAIL]
    assert [t.number for t in failed] == [killed]

    # Pareto front from the database == single-process computation over the same trials
    from_db = {t.number for t in study.best_trials}
    single = _pareto({t.number: (t.values[0], t.values[1]) for t in complete})
    assert from_db == single
    mem = optuna.create_study(directions=["minimize", "maximize"])
    for t in complete:
        mem.add_trial(t)
    assert {tuple(t.values) for t in mem.best_trials} == {
        tuple(study.trials[n].values) for n in from_db
    }


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "worker":
        _worker(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]))
    else:
        sys.exit("usage: test_distributed.py worker URL STUDY MARKER_DIR ROLE SEED")
