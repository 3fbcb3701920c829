"""Every search strategy satisfies the ``Strategy`` contract (``autoprune/strategies/base.py``).

A new strategy is one more entry in ``STRATEGIES`` (a factory returning a fresh instance); a
registered strategy name missing from ``STRATEGIES`` fails the suite. The problem is the toy
spec of ``test_space`` with a deterministic latency model and the data-free proxy (no backend,
no analyze), as in ``test_strategies``.
"""

from __future__ import annotations

import json
import math

import optuna
import pytest
from test_space import toy_problem

from autoprune.storage import make_storage
from autoprune.strategies import SearchProblem, Strategy, get_strategy, list_strategies
from autoprune.strategies.base import MAXIMIZE, MINIMIZE

STRATEGIES = {
    "tpe": lambda: get_strategy("tpe"),
    "nsga2": lambda: get_strategy("nsga2"),
    "motpe": lambda: get_strategy("motpe"),
    "random": lambda: get_strategy("random"),
    "rl": lambda: get_strategy("rl"),
    "greedy": lambda: get_strategy("greedy"),
    # any Optuna sampler a user passes is wrapped into a strategy
    "user-sampler": lambda: get_strategy(optuna.samplers.RandomSampler(seed=3)),
}
#: strategies that choose their plans along a finite path and may stop before ``n_trials``
_MAY_STOP_EARLY = {"greedy"}
N = 10


@pytest.fixture(params=sorted(STRATEGIES))
def name(request) -> str:
    if request.param == "rl":
        pytest.importorskip("stable_baselines3", reason="strategy 'rl' needs autoprune[rl]")
        pytest.importorskip("gymnasium", reason="strategy 'rl' needs autoprune[rl]")
    return request.param


def _problem(run_dir, proxy=None, study: str = "conf", seed: int = 0) -> SearchProblem:
    return toy_problem(run_dir, proxy, study=study, seed=seed)


def _counted(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.state.name == "COMPLETE" or "error" in t.user_attrs]


def _run(name: str, problem: SearchProblem, n: int = N) -> optuna.Study:
    return STRATEGIES[name]().run(problem, n)


def _key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def _trace(study: optuna.Study) -> list[tuple]:
    return [(t.state.name, t.params, t.values, t.user_attrs.get("predicted_latency_ms"))
            for t in study.trials]


def test_every_registered_strategy_is_in_the_suite():
    assert set(list_strategies()) <= set(STRATEGIES)


def test_interface(name):
    s = STRATEGIES[name]()
    assert isinstance(s, Strategy) and s.name and repr(s)
    assert s.directions in ([MAXIMIZE], [MAXIMIZE, MINIMIZE])
    assert s.n_objectives == len(s.directions)
    assert get_strategy(s) is s  # a Strategy passes through the registry unchanged


def test_respects_the_trial_count_and_records_every_trial(tmp_path, name):
    problem = _problem(tmp_path)
    study = _run(name, problem)
    assert study is problem.study  # the problem's study holds the trials
    counted = _counted(study)
    assert len(counted) <= N and problem.n_done(study) == len(counted)
    if name not in _MAY_STOP_EARLY:
        assert len(counted) == N
    else:
        assert len(counted) >= 2
    assert len(study.directions) == STRATEGIES[name]().n_objectives
    assert study.user_attrs["strategy"] and study.user_attrs["budget_ms"] == problem.budget_ms
    # the trial was stored, not just returned: a fresh storage on the same journal sees it
    stored = optuna.load_study(study_name="conf", storage=make_storage(None, tmp_path))
    assert _trace(stored) == _trace(study)


def test_proposes_valid_plans_with_their_bookkeeping(tmp_path, name):
    problem = _problem(tmp_path)
    study = _run(name, problem)
    spec = problem.space.spec
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert complete
    for t in complete:
        plan = problem.space.decode(t.params)
        plan.validate(spec)
        assert t.user_attrs["plan"] == plan.to_dict()
        lat = float(problem.latency_ms([plan])[0])
        assert math.isclose(t.user_attrs["predicted_latency_ms"], lat)
        assert math.isclose(t.user_attrs["constraint"], lat - problem.budget_ms)
        macs, params = spec.count(plan)
        assert (t.user_attrs["macs"], t.user_attrs["params"]) == (macs, params)
        assert math.isclose(t.values[0], problem.proxy(plan))
        if len(t.values) == 2:
            assert math.isclose(t.values[1], lat)
    # the proxy ranks something: at least one plan within the budget was found
    assert any(t.user_attrs["constraint"] <= 0 for t in complete)


def test_is_deterministic_under_a_seed(tmp_path, name):
    a = _run(name, _problem(tmp_path / "a"))
    b = _run(name, _problem(tmp_path / "b"))
    assert _trace(a) == _trace(b)


def test_resumes_and_runs_only_what_is_missing(tmp_path, name):
    first = _run(name, _problem(tmp_path), n=N // 2)
    before = {(t.number, _key(t.params)) for t in _counted(first)}
    assert before
    # a new process: a new storage object on the same journal file
    study = _run(name, _problem(tmp_path))
    counted = _counted(study)
    assert before <= {(t.number, _key(t.params)) for t in counted}
    assert len(counted) == N or (name in _MAY_STOP_EARLY and len(counted) >= len(before))
    n_trials = len(study.trials)
    # the same n_trials again: nothing more is run
    assert len(_run(name, _problem(tmp_path)).trials) == n_trials


def test_zero_trials_runs_nothing(tmp_path, name):
    assert len(_run(name, _problem(tmp_path), n=0).trials) == 0


def test_failing_proxy_fails_trials_and_the_search_goes_on(tmp_path, name):
    base = _problem(tmp_path / "base").proxy
    calls = {"n": 0}

    def flaky(plan):
        calls["n"] += 1
        if calls["n"] % 2:
            raise RuntimeError("evaluator exploded")
        return base(plan)

    study = _run(name, _problem(tmp_path, proxy=flaky))
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert failed and all(t.user_attrs["error"] == "RuntimeError: evaluator exploded"
                          for t in failed)
    counted = _counted(study)
    assert len(counted) == N or (name in _MAY_STOP_EARLY and len(counted) >= 2)
    assert any(t.state.name == "COMPLETE" for t in counted)


def test_callbacks_see_every_trial(tmp_path, name):
    problem = _problem(tmp_path)
    seen: list[int] = []
    problem.callbacks.append(lambda study, trial: seen.append(trial.number))
    study = _run(name, problem)
    assert seen == [t.number for t in study.trials]
