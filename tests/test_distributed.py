"""Distributed search on a real PostgreSQL server (started here; no SQLite stand-in).

Three ``autoprune.search`` worker processes share one study through
``autoprune.storage.make_storage``; one is killed with SIGKILL in the middle of a trial. The
study must still reach its trial count, every completed trial must be there exactly once, the
killed trial must be failed by the heartbeat machinery and its plan retried, and the Pareto front
read from the database must equal the one a single process computes from the same trials.

The workers search conv1d_net on the synthetic device with a table-sum latency and a cheap plan
evaluator as the proxy, so the test measures the coordination, not profiling or training.
This file is also the worker program: ``python tests/test_distributed.py search-worker ...``.
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
N_WORKERS = 3
N_SEARCH = 24  # after the kill the survivors still need >= 5 s; the heartbeat grace is 3 s
TRIAL_S = 0.5
HEARTBEAT_S = 1
GRACE_S = 3


# --- the worker program -------------------------------------------------------------------


class _PlanScore:
    """A plan evaluator for ``autoprune.search``: a deterministic score of the plan (share of
    weights kept, square-rooted) after a short sleep; the victim sleeps until it is killed.
    Each call leaves ``start-``/``done-`` marker files so the test can time the kill."""

    def __init__(self, spec, markers: Path, role: str) -> None:  # noqa: ANN001
        self.spec, self.markers, self.role = spec, markers, role
        self.dense_params = spec.count()[1]
        self.calls = 0

    def evaluate_plan(self, plan) -> float:  # noqa: ANN001
        self.calls += 1
        tag = f"{os.getpid()}-{self.calls}"
        (self.markers / f"start-{tag}").write_text(plan.to_json())
        time.sleep(600.0 if self.role == "victim" else TRIAL_S)
        score = (self.spec.count(plan)[1] / self.dense_params) ** 0.5
        (self.markers / f"done-{tag}").write_text(plan.to_json())
        return score


def search_setup():  # noqa: ANN201
    """The model, inputs, synthetic device, spec, table and table-sum predictor every search
    worker (and the test) builds identically."""
    import torch

    from autoprune._analyze import analyze
    from autoprune.backends import get_backend
    from autoprune.latency._profile import profile
    from autoprune.zoo import conv1d_net

    torch.manual_seed(0)
    model = conv1d_net(width=16)
    x = (torch.randn(1, 1, 40),)
    backend = get_backend("synthetic")
    spec = analyze(model, x)
    table = profile(model, x, backend, spec=spec, root=False, progress=False)

    def predict_ms(plan) -> float:  # noqa: ANN001 - table-only latency
        return float(sum(table.lookup(p.spec, p.structure, p.density, policy="interpolate")
                         for p in spec.pruned_layers(plan)))

    from autoprune.plan import PruningPlan

    budget_ms = 0.9 * predict_ms(PruningPlan.dense(spec))
    return model, x, backend, spec, table, predict_ms, budget_ms


def _search_worker(url: str, study_name: str, marker_dir: str, role: str, seed: int) -> None:
    import autoprune as ap
    from autoprune.storage import make_storage

    warnings.filterwarnings("ignore")
    markers = Path(marker_dir)
    model, x, backend, spec, table, predict_ms, budget_ms = search_setup()
    run_dir = markers / f"run-{os.getpid()}"
    storage = make_storage(url, run_dir, heartbeat_interval_s=HEARTBEAT_S, grace_period_s=GRACE_S)
    ap.search(model, x, device=backend, latency_budget_ms=budget_ms,
              evaluator=_PlanScore(spec, markers, role), n_trials=N_SEARCH, strategy="tpe",
              table=table, predictor=predict_ms, spec=spec, storage=storage,
              study_name=study_name, run_dir=run_dir, seed=seed, progress=False,
              verify_finalists=False)
    (markers / f"exit-{os.getpid()}").write_text(str(time.time()))


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


def _spawn(url: str, study: str, markers: Path, role: str, seed: int,
           mode: str = "search-worker") -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), mode, url, study, str(markers), role,
         str(seed)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


_OPEN_TOGETHER = """
import sys, time
start, url, plain = float(sys.argv[1]), sys.argv[2], sys.argv[3] == "plain"
import optuna
from autoprune.storage import make_storage
time.sleep(max(0.0, start - time.time()))
if plain:
    optuna.storages.RDBStorage(url)
else:
    make_storage(url, "/tmp", heartbeat_interval_s=1)
"""


def _open_together(url: str, n: int, plain: bool) -> list[int]:
    start = time.time() + 4.0  # every process imported and waiting by then
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN_TOGETHER, str(start), url,
                               "plain" if plain else "autoprune"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(n)]
    return [p.wait(timeout=120) for p in procs]


@pytest.mark.postgres
@pytest.mark.timeout(120)
def test_workers_opening_an_empty_database_together_all_succeed(postgres) -> None:
    """Optuna's table creation races on a fresh PostgreSQL database ("duplicate key value
    violates unique constraint pg_type_typname_nsp_index"); make_storage retries it."""
    url = postgres.create_database("race")
    assert _open_together(url, 3, plain=False) == [0] * 3


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
@pytest.mark.timeout(300)
def test_autoprune_search_workers_survive_a_sigkill_mid_trial(postgres, tmp_path: Path) -> None:
    """Three ``search`` calls share one study on PostgreSQL; one is SIGKILLed mid-trial."""
    import optuna

    from autoprune._search import pareto_front, trials_frame
    from autoprune.storage import make_storage

    warnings.filterwarnings("ignore")
    url = postgres.create_database("dist_search")
    markers = tmp_path / "markers"
    markers.mkdir()

    # all three start together; the victim is killed once it is inside a trial and a survivor
    # has finished one (the rest of the study then takes longer than the heartbeat grace)
    victim = _spawn(url, "s", markers, "victim", seed=0)
    workers = [_spawn(url, "s", markers, "worker", seed=s) for s in (1, 2)]
    deadline = time.monotonic() + 120
    while not (list(markers.glob(f"start-{victim.pid}-*")) and list(markers.glob("done-*"))):
        assert victim.poll() is None, victim.stdout.read().decode()
        assert all(w.poll() is None for w in workers), [w.stdout.read().decode() for w in workers]
        assert time.monotonic() < deadline, "victim never started a trial"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    for w in workers:
        out = w.communicate(timeout=240)[0].decode()
        assert w.returncode == 0, out

    _, _, _, spec, _, _, budget_ms = search_setup()
    study = optuna.load_study(study_name="s", storage=make_storage(url, tmp_path))
    TS = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TS.COMPLETE]
    # the study reached its trial count; nothing left running or queued
    assert N_SEARCH <= len(complete) <= N_SEARCH + N_WORKERS - 1
    assert not [t for t in trials if t.state in (TS.RUNNING, TS.WAITING)]
    # each trial exactly once: unique numbers; every completed trial is one finished evaluation
    assert len({t.number for t in trials}) == len(trials)
    # every completed trial's plan was evaluated by a surviving worker (a plan a worker had
    # already scored comes from its cache, so there may be fewer evaluations than trials)
    # (after its search each worker also scores the dense model, outside any trial)
    key = lambda plan: json.dumps(plan, sort_keys=True)  # noqa: E731
    from autoprune.plan import PruningPlan

    dense = key(PruningPlan.dense(spec).to_dict())
    evaluated = {key(json.loads(p.read_text())) for p in markers.glob("done-*")}
    assert {key(t.user_attrs["plan"]) for t in complete} == evaluated - {dense} or \
        {key(t.user_attrs["plan"]) for t in complete} == evaluated

    # the killed trial: failed by the heartbeat machinery, its plan retried and completed
    (killed_marker,) = markers.glob(f"start-{victim.pid}-*")
    failed = [t for t in trials if t.state == TS.FAIL]
    assert len(failed) == 1 and "error" not in failed[0].user_attrs
    killed = failed[0]
    assert killed.user_attrs["plan"] == json.loads(killed_marker.read_text())
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].state == TS.COMPLETE
    assert retries[0].params == killed.params

    # Pareto front: autoprune's, from the database, equals a plain single-process computation
    # over the same trials, and the one saved by the worker that finished last
    frame = trials_frame(study, spec, budget_ms, float("nan"))
    front = {(r.predicted_latency_ms, r.proxy) for r in pareto_front(frame).itertuples()}
    feasible = {t.number: (t.user_attrs["predicted_latency_ms"], t.values[0]) for t in complete
                if t.user_attrs["predicted_latency_ms"] <= budget_ms}
    single = {feasible[n] for n in _pareto(feasible)}
    assert len(single) >= 2
    assert front == single
    last = max(workers, key=lambda w: float((markers / f"exit-{w.pid}").read_text()))
    saved = pd_read(markers / f"run-{last.pid}" / "pareto_front.csv")
    assert {(r.predicted_latency_ms, r.proxy) for r in saved.itertuples()} == front


def pd_read(path: Path):  # noqa: ANN201
    import pandas as pd

    return pd.read_csv(path)


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "search-worker":
        _search_worker(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]))
    else:
        sys.exit("usage: test_distributed.py search-worker URL STUDY MARKER_DIR ROLE SEED")
