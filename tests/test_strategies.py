"""Strategies: one conformance test for every registered strategy, failure handling, resume,
greedy path, RL budget enforcement. Runs on the toy spec with a deterministic latency model
and the data-free proxy (no backend, no analyze)."""

from __future__ import annotations

import math

import optuna
import pytest
from test_space import toy_latency, toy_problem, toy_spec

from autoprune.errors import InvalidInputError, UnknownNameError
from autoprune.strategies import SearchProblem, get_strategy, list_strategies
from autoprune.strategies.greedy import greedy_path, greedy_plan, uniform_plan
from autoprune.strategies.optuna_strategy import OptunaStrategy


def _problem(tmp_path, proxy=None, budget_ratio: float = 0.6, name: str = "s") -> SearchProblem:
    return toy_problem(tmp_path, proxy, budget_ratio=budget_ratio, study=name)


def _counted(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.state.name == "COMPLETE" or "error" in t.user_attrs]


@pytest.mark.parametrize("name", ["tpe", "nsga2", "motpe", "random", "greedy", "rl"])
def test_every_strategy_finds_feasible_plans(tmp_path, name):
    problem = _problem(tmp_path)
    n = 24
    strategy = get_strategy(name)
    study = strategy.run(problem, n)
    counted = _counted(study)
    assert len(counted) <= n
    assert len(counted) == n or name == "greedy"  # greedy stops when its path is exhausted
    feasible = [t for t in counted if t.state.name == "COMPLETE"
                and t.user_attrs["predicted_latency_ms"] <= problem.budget_ms]
    assert feasible, f"{name} found no feasible plan"
    best = max(t.values[0] for t in feasible)
    assert 0 < best < 1
    assert len(study.directions) == (2 if name in ("nsga2", "motpe") else 1)
    for t in counted:
        plan = problem.space.decode(t.params)
        plan.validate(problem.space.spec)
        assert math.isclose(t.user_attrs["predicted_latency_ms"],
                            float(problem.latency_ms([plan])[0]))
    if name == "rl":  # budget enforced by limiting actions: every episode is feasible
        assert len(feasible) == len(counted)


def test_registry_and_user_sampler():
    assert set(list_strategies()) == {"tpe", "nsga2", "motpe", "random", "rl", "greedy"}
    with pytest.raises(UnknownNameError, match="unknown strategy 'cmaes'; known: greedy, motpe"):
        get_strategy("cmaes")
    with pytest.raises(InvalidInputError, match="strategy must be a name"):
        get_strategy(3)
    s = get_strategy(optuna.samplers.QMCSampler(seed=0))
    assert isinstance(s, OptunaStrategy) and s.directions == ["maximize"]
    s2 = get_strategy(optuna.samplers.NSGAIISampler(seed=0))
    assert s2.directions == ["maximize", "minimize"]


def test_user_sampler_runs(tmp_path):
    problem = _problem(tmp_path)
    study = get_strategy(optuna.samplers.RandomSampler(seed=1)).run(problem, 6)
    assert len(_counted(study)) == 6


def test_failing_and_nan_proxy_fail_the_trial_and_the_search_goes_on(tmp_path):
    calls = {"n": 0}
    base = _problem(tmp_path).importance

    def flaky(plan):
        calls["n"] += 1
        if calls["n"] % 3 == 1:
            raise RuntimeError("evaluator exploded")
        if calls["n"] % 3 == 2:
            return float("nan")
        return base.evaluate_plan(plan)

    problem = _problem(tmp_path, proxy=flaky, name="flaky")
    study = get_strategy("tpe", warm_start=False).run(problem, 9)
    states = [t.state.name for t in study.trials]
    assert states.count("FAIL") == 6 and states.count("COMPLETE") == 3
    errors = [t.user_attrs.get("error", "") for t in study.trials if t.state.name == "FAIL"]
    assert sum("RuntimeError: evaluator exploded" in e for e in errors) == 3
    assert sum(e == "proxy returned nan" for e in errors) == 3


def test_resume_after_interrupt_keeps_trials(tmp_path):
    calls = {"n": 0}
    base = _problem(tmp_path).importance

    def interrupted(plan):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return base.evaluate_plan(plan)

    problem = _problem(tmp_path, proxy=interrupted, name="resume")
    with pytest.raises(KeyboardInterrupt):
        get_strategy("tpe").run(problem, 12)
    first = optuna.load_study(study_name="resume", storage=problem.storage)
    done_before = [t.number for t in first.trials if t.state.name == "COMPLETE"]
    assert len(done_before) == 5
    # a new process: new storage object on the same journal file
    problem2 = _problem(tmp_path, name="resume")
    study = get_strategy("tpe").run(problem2, 12)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 12
    assert set(done_before) <= {t.number for t in complete}
    assert len(study.trials) == 13  # the interrupted trial stays FAIL, without an error
    # running again with the same n_trials does nothing more
    assert len(get_strategy("tpe").run(_problem(tmp_path, name="resume"), 12).trials) == 13


def test_study_for_other_objectives_is_refused(tmp_path):
    problem = _problem(tmp_path, name="same")
    get_strategy("tpe").run(problem, 3)
    with pytest.raises(InvalidInputError, match="created with 1 objective"):
        get_strategy("nsga2").run(_problem(tmp_path, name="same"), 3)


def test_greedy_path_and_warm_start(tmp_path):
    problem = _problem(tmp_path, budget_ratio=0.5, name="warm")
    path = greedy_path(problem)
    lats = [lat for _, lat, _ in path]
    scores = [s for _, _, s in path]
    assert lats[-1] <= problem.budget_ms < lats[0]
    assert all(b <= a + 1e-12 for a, b in zip(scores, scores[1:]))  # importance only drops
    plan = greedy_plan(problem)
    assert plan is not None
    study = get_strategy("tpe").run(problem, 3)
    first = study.trials[0]
    assert first.user_attrs["plan"] == plan.to_dict()  # the warm start is trial 0
    # trial 1: the widest uniform plan within the budget (one keep ratio for every group)
    uni = uniform_plan(problem)
    assert uni is not None and study.trials[1].user_attrs["plan"] == uni.to_dict()
    assert study.trials[1].user_attrs["predicted_latency_ms"] <= problem.budget_ms
    ratios = {round(gp.keep_ratio * problem.space.groups[n].units)
              / problem.space.groups[n].units for n, gp in uni.groups.items()}
    assert max(ratios) - min(ratios) < 0.2  # same keep ratio up to width-grid rounding
    # an impossible budget: no greedy or uniform plan, and the warm start is skipped
    tiny = _problem(tmp_path, budget_ratio=0.01, name="tiny")
    assert greedy_plan(tiny) is None and uniform_plan(tiny) is None


def test_greedy_keeps_more_than_uniform_pruning_at_the_same_budget(tmp_path):
    """What users do today: one keep ratio for every group, lowered until the budget is met.
    Greedy spends the budget where it costs least importance, so it keeps at least as much."""
    problem = _problem(tmp_path, budget_ratio=0.5, name="g")
    space = problem.space
    g = problem.importance.evaluate_plan(greedy_plan(problem))
    uniform = None
    for i in range(len(space.groups["c1"].widths) - 1, -1, -1):
        params = {}
        for c in space.searchable_groups:
            if c.kind == "channel":
                params[f"keep:{c.name}"] = round(i * (len(c.widths) - 1) /
                                                 (len(space.groups["c1"].widths) - 1))
                if len(c.structures) > 1:
                    params[f"structure:{c.name}"] = "channel"
        plan = space.decode(params)
        if problem.latency_ms([plan])[0] <= problem.budget_ms:
            uniform = problem.importance.evaluate_plan(plan)
            break
    assert uniform is not None and g >= uniform


@pytest.mark.parametrize("name", ["greedy", "rl"])
def test_queued_retry_is_run_first_and_ask_tell_strategies_keep_their_plans(tmp_path, name):
    """A trial queued in the study (the retry of a worker that died) is evaluated before an
    ask/tell strategy starts, so every later trial is the plan the strategy enqueued."""
    problem = _problem(tmp_path, name=f"q{name}")
    strategy = get_strategy(name)
    study = strategy.open(problem)
    dense_params = problem.space.encode(problem.space.dense_plan())
    study.enqueue_trial(dense_params)
    study = strategy.run(problem, 6)
    first = study.trials[0]
    assert first.params == dense_params and first.state.name == "COMPLETE"
    if name == "rl":  # every later trial is an RL episode: feasible by construction
        assert all(t.user_attrs["constraint"] <= 0 for t in study.trials[1:])
    else:  # the greedy end point within the budget is among them
        target = greedy_plan(problem).to_dict()
        assert any(t.user_attrs["plan"] == target for t in study.trials[1:])


def test_plans_the_latency_model_cannot_price_fail_their_trial(tmp_path):
    """A table miss (or any predictor error) fails that trial with the reason; greedy treats
    such plans as infinitely slow; the search goes on."""
    from autoprune._search import _latency_fn
    from autoprune.errors import TableMissError

    spec = toy_spec()
    base = toy_latency(spec)

    class Picky:  # a user's plan -> ms callable that raises for some plans
        def __call__(self, plan):
            if spec.kept_units(plan)["c3"] < 40:
                raise TableMissError("cannot interpolate c3 below 40 channels")
            return float(base([plan])[0])

    problem = _problem(tmp_path, name="picky", budget_ratio=0.8)
    problem.latency_ms = _latency_fn(Picky())
    study = get_strategy("random").run(problem, 12)
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert failed and all("latency prediction failed: TableMissError: cannot interpolate"
                          in t.user_attrs["error"] for t in failed)
    assert len(_counted(study)) == 12
    path = greedy_path(problem)
    assert all(math.isfinite(lat) for _, lat, _ in path)
    assert all(spec.kept_units(p)["c3"] >= 40 for p, _, _ in path)
