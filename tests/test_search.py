"""search() end to end on resnet18 (32x32, 10 classes) with the real ONNX Runtime CPU backend
and sklearn digits: measured budget, Pareto front, resume, failing evaluators, infeasible
budgets, results on disk, CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch

import autoprune as ap
from autoprune._search import TRIAL_COLUMNS, SearchResult
from autoprune.data import digits_loaders
from autoprune.errors import InfeasibleBudgetError, InvalidInputError
from autoprune.evaluators import ImportanceProxy, accuracy_evaluator
from autoprune.latency._model import TableLatencyModel
from autoprune.measure import ProtocolSettings


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    train, test = digits_loaders(size=32, batch_size=64)
    from autoprune.zoo import torchvision_model

    model = torchvision_model("resnet18", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for i, (x, y) in enumerate(train):  # 15 steps: enough for the proxy to carry signal
        if i == 15:
            break
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    backend = ap.get_backend("onnxruntime-cpu", threads=1, protocol=ProtocolSettings.quick())
    spec = ap.analyze(model, x)
    root = tmp_path_factory.mktemp("tables")
    table = ap.profile(model, x, backend, spec=spec, root=root, progress=False)
    space = ap.SearchSpace.from_spec(spec, table, backend)
    latency = TableLatencyModel(table, spec).fit(model, x, backend,
                                                 [space.dense_plan(), space.fastest_plan()])
    dense_ms = float(latency.predict(space.dense_plan()))
    return dict(model=model, x=x, backend=backend, spec=spec, table=table, space=space,
                latency=latency, dense_ms=dense_ms, train=train, test=test, root=root)


def _search(s, tmp_path, **kw):
    args = dict(device=s["backend"], latency_budget_ms=0.7 * s["dense_ms"], table=s["table"],
                predictor=s["latency"], spec=s["spec"], run_dir=tmp_path / "run",
                progress=False)
    args.update(kw)
    return ap.search(s["model"], s["x"], **args)


@pytest.mark.slow
def test_tpe_plan_meets_the_budget_when_measured(setup, tmp_path):
    s = setup
    ev = accuracy_evaluator(s["test"], calib_loader=s["train"], bn_recalibration_batches=2,
                            max_batches=1)
    # checked as a paired ratio against dense (what run_pipeline does with a fraction): an
    # absolute budget in ms failed here when the VM ran 16% slower than during profiling
    from autoprune.budget import Budget

    result = _search(s, tmp_path, evaluator=ev, n_trials=10,
                     latency_budget_ms=0.7 * s["dense_ms"],
                     finalist_budget=Budget.of(budget_fraction=0.7))
    assert result.best_plan is not None, result.notes
    fin = result.finalists
    chosen = fin[fin["chosen"]]
    assert len(chosen) == 1
    assert float(chosen["measured_ratio"].iloc[0]) <= 0.7
    assert float(result.best_trial["proxy"]) == float(chosen["proxy"].iloc[0])
    assert result.knee() is not None
    # every finalist that missed the budget is reported in the notes
    for n in fin.loc[~fin["meets_budget"], "trial"]:
        assert any(f"trial {n} " in note for note in result.notes)
    # an independent re-measurement agrees (shared, noisy CPU: 20% tolerance)
    pruned = ap.apply_plan(s["model"], result.best_plan, s["x"]).eval()
    ratio, _ = s["backend"].measure_ratio(pruned, copy.deepcopy(s["model"]).eval(), s["x"])
    assert ratio <= 1.2 * 0.7
    # the proxy carries signal: the best plan is far above chance (10%)
    assert float(chosen["proxy"].iloc[0]) > 0.3
    # documented columns, one keep/structure column per group
    t = result.trials
    assert list(t.columns[: len(TRIAL_COLUMNS)]) == list(TRIAL_COLUMNS)
    for g in s["spec"].groups:
        assert f"keep:{g}" in t.columns and f"structure:{g}" in t.columns
    assert t["measured_latency_ms"].notna().sum() == len(fin)
    # files
    d = result.run_dir
    for name in ("trials.csv", "pareto_front.csv", "finalists.csv", "best_plan.json",
                 "search_result.json", "study.journal"):
        assert (d / name).exists(), name
    again = SearchResult.load(d)
    assert again.best_plan.to_dict() == result.best_plan.to_dict()
    assert len(again.trials) == len(t)
    png = result.plot(tmp_path / "front.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_front_is_non_dominated(setup, tmp_path):
    result = _search(setup, tmp_path, strategy="nsga2", n_trials=20, verify_finalists=False)
    front = result.pareto_front()
    assert list(front.columns) == list(result.trials.columns)
    assert len(front) >= 2 and front["feasible"].all()
    assert (front["state"] == "COMPLETE").all()
    feas = result.trials[result.trials["feasible"]]
    for _, p in front.iterrows():
        dominated = feas[(feas["proxy"] >= p["proxy"])
                         & (feas["predicted_latency_ms"] <= p["predicted_latency_ms"])
                         & ((feas["proxy"] > p["proxy"])
                            | (feas["predicted_latency_ms"] < p["predicted_latency_ms"]))]
        assert dominated.empty
    # every feasible trial not on the front is dominated by a front point
    off = feas[~feas["trial"].isin(front["trial"])]
    for _, r in off.iterrows():
        assert ((front["proxy"] >= r["proxy"])
                & (front["predicted_latency_ms"] <= r["predicted_latency_ms"])).any()
    assert np.all(np.diff(front["predicted_latency_ms"]) >= 0)
    assert np.all(np.diff(front["proxy"]) > 0)


class _Interrupting:
    """A plan evaluator that raises KeyboardInterrupt on its n-th call (like Ctrl-C)."""

    def __init__(self, inner, at: int) -> None:
        self.inner, self.at, self.calls = inner, at, 0

    def evaluate_plan(self, plan):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.inner.evaluate_plan(plan)


def test_resume_after_interruption_keeps_the_trials(setup, tmp_path):
    s = setup
    proxy = ImportanceProxy(s["model"], s["spec"]).fit()
    with pytest.raises(KeyboardInterrupt):
        _search(s, tmp_path, evaluator=_Interrupting(proxy, 7), n_trials=12,
                verify_finalists=False)
    journal = tmp_path / "run" / "study.journal"
    assert journal.exists()
    result = _search(s, tmp_path, evaluator=proxy, n_trials=12, verify_finalists=False)
    t = result.trials
    assert (t["state"] == "COMPLETE").sum() == 12
    assert len(t) == 13 and (t["state"] == "FAIL").sum() == 1  # the interrupted one
    assert t.loc[t["state"] == "FAIL", "trial"].iloc[0] == 6
    # the first six trials are those of the interrupted run (same numbers and plans)
    assert list(t["trial"].iloc[:6]) == list(range(6))
    # a third call with the same arguments has nothing left to do
    again = _search(s, tmp_path, evaluator=proxy, n_trials=12, verify_finalists=False)
    assert len(again.trials) == 13
    pd.testing.assert_frame_equal(again.trials.drop(columns=["measured_latency_ms"]),
                                  t.drop(columns=["measured_latency_ms"]))


def test_evaluator_errors_and_nan_fail_only_their_trial(setup, tmp_path):
    calls = {"n": 0}

    def flaky(model: torch.nn.Module) -> float:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("calibration loader went away")
        if calls["n"] == 3:
            return float("nan")
        return float(sum(p.numel() for p in model.parameters())) / 1e7

    result = _search(setup, tmp_path, evaluator=flaky, n_trials=5, verify_finalists=False,
                     strategy="random")
    t = result.trials
    assert len(t) == 5 and (t["state"] == "COMPLETE").sum() == 3
    errs = t.loc[t["state"] == "FAIL", "error"].tolist()
    assert errs == ["RuntimeError: calibration loader went away", "proxy returned nan"]
    assert result.best_plan is not None


def test_budget_checks(setup, tmp_path):
    s = setup
    fastest = float(s["latency"].predict(s["space"].fastest_plan()))
    with pytest.raises(InfeasibleBudgetError,
                       match=rf"fastest plan in the search space is predicted at {fastest:.4g} ms"):
        _search(s, tmp_path, latency_budget_ms=fastest * 0.5, n_trials=2)
    for bad in (0, -1.0, float("nan"), "2ms"):
        with pytest.raises(InvalidInputError, match="latency_budget_ms must be"):
            _search(s, tmp_path, latency_budget_ms=bad, n_trials=2)
    with pytest.raises(ap.errors.UnknownNameError, match="unknown strategy 'annealing'"):
        _search(s, tmp_path, strategy="annealing", n_trials=2)


@pytest.mark.slow
def test_cli_search_prints_the_front(setup, tmp_path, capsys):
    from autoprune.cli import main

    s = setup
    code = main([
        "search", "--model", "torchvision.models:resnet18", "--num-classes", "10",
        "--input-shape", "1,3,32,32", "--budget-ms", f"{0.7 * s['dense_ms']:.4f}",
        "--trials", "6", "--predictor", "table", "--tables-root", str(s["root"]),
        "--run-dir", str(tmp_path / "cli"), "--quiet", "--finalists", "1",
    ])
    out = capsys.readouterr().out
    assert "Pareto front" in out and "predicted_latency_ms" in out
    assert (tmp_path / "cli" / "trials.csv").exists()
    trials = pd.read_csv(tmp_path / "cli" / "trials.csv")
    assert len(trials) == 6
    assert code in (0, 1)  # 1 only if no finalist met the budget when measured
    if code == 0:
        plan = json.loads((tmp_path / "cli" / "best_plan.json").read_text())
        assert plan["model_name"]


# --- the stages behind the facade (synthetic device: fast, deterministic) ---------------------
@pytest.fixture(scope="module")
def syn():
    from _latency_helpers import synthetic_conv1d

    return synthetic_conv1d(width=32)


def _syn_search(s, **kw):
    args = dict(device=s["backend"], latency_budget_ms=0.7 * s["dense_ms"], table=s["table"],
                predictor=s["predict_ms"], spec=s["spec"], n_trials=8, progress=False)
    args.update(kw)
    return ap.search(s["model"], s["x"], **args)


def test_trials_carry_plan_json_that_round_trips_to_the_plan(syn, tmp_path):
    import optuna

    from autoprune._search import PLAN_COLUMN
    from autoprune.plan import PruningPlan
    from autoprune.storage import make_storage

    result = _syn_search(syn, run_dir=tmp_path / "run", verify_finalists=False)
    t = result.trials
    assert PLAN_COLUMN in t.columns and t[PLAN_COLUMN].map(bool).all()
    study = optuna.load_study(study_name=result.study_name,
                              storage=make_storage(None, tmp_path / "run"))
    for trial in study.get_trials(deepcopy=False):
        want = PruningPlan.from_dict(trial.user_attrs["plan"]).to_dict()
        assert result.plan(trial.number).to_dict() == want
        row = t.loc[t["trial"] == trial.number, PLAN_COLUMN].iloc[0]
        assert PruningPlan.from_json(row).to_dict() == want
    # the saved result keeps them (CSV round trip), and the finalists' plans are the trials'
    again = SearchResult.load(tmp_path / "run")
    for n in t["trial"]:
        assert again.plan(int(n)).to_dict() == result.plan(int(n)).to_dict()
    n = int(result.finalists["trial"].iloc[0])
    assert result.finalists["plan"].iloc[0] == t.loc[t["trial"] == n, PLAN_COLUMN].iloc[0]
    assert result.best_plan.to_dict() == result.plan(n).to_dict()
    with pytest.raises(InvalidInputError, match="no trial 999"):
        result.plan(999)


def test_optimize_is_the_pure_stage(syn):
    """optimize runs the study and returns trials; it takes no backend, so it measures nothing
    on the device."""
    import optuna

    from autoprune._search import CachedProxy, latency_fn, optimize
    from autoprune.strategies.base import SearchProblem

    s = syn
    space = ap.SearchSpace.from_spec(s["spec"], s["table"], s["backend"])

    proxy = ImportanceProxy(s["model"], s["spec"]).fit()
    budget = 0.6 * s["dense_ms"]
    problem = SearchProblem(space=space, latency_ms=latency_fn(s["predict_ms"]),
                            proxy=CachedProxy(proxy, None, None, s["spec"]), budget_ms=budget,
                            storage=optuna.storages.InMemoryStorage(), study_name="pure")
    trials = optimize(problem, "random", 6)
    assert len(trials) == 6 and (trials["state"] == "COMPLETE").all()
    assert (trials["feasible"] == (trials["predicted_latency_ms"] <= budget)).all()
    assert trials["latency_low_ms"].isna().all()  # no latency model given: no band
    with pytest.raises(InvalidInputError, match="n_trials must be"):
        optimize(problem, "random", 0)


def test_cached_proxy_of_a_model_evaluator_needs_the_model():
    """A model evaluator scores pruned models: without the model CachedProxy says so."""
    from torch import nn

    from autoprune._search import CachedProxy

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(2, 4)
    spec = ap.analyze(model, x)
    plan = ap.PruningPlan.uniform(spec, 0.5)
    with pytest.raises(InvalidInputError, match="needs the model.*model=None"):
        CachedProxy(lambda m: 1.0, None, x, spec)(plan)
    assert CachedProxy(lambda m: 1.0, model, x, spec)(plan) == 1.0


def test_select_finalists_is_the_only_finalist_path(syn, tmp_path, monkeypatch):
    """search() and run_pipeline both choose their plan through select_finalists."""
    import autoprune._search._finalists as fin_module

    calls = []
    real = fin_module.select_finalists

    def spy(trials, *a, **k):
        calls.append((a[4], k))  # the budget
        return real(trials, *a, **k)

    monkeypatch.setattr(fin_module, "select_finalists", spy)
    s = syn
    from autoprune.budget import Budget

    # the synthetic device's whole-model timings carry an overhead its table does not: check
    # the measured finalists against a budget they can meet
    result = _syn_search(s, finalist_budget=Budget.of(latency_budget_ms=1.0))
    assert len(calls) == 1 and calls[0][0].ms == 1.0
    assert result.best_plan is not None and result.finalists["chosen"].sum() == 1
    from autoprune.pipeline import run_pipeline

    rep = run_pipeline(s["model"], s["x"], budget_fraction=0.9, device="synthetic",
                       run_dir=tmp_path / "pipe", table=s["table"], predictor=s["predict_ms"],
                       n_trials=6, finetune_epochs=0, export=False, progress=False)
    assert len(calls) == 2 and calls[1][0].is_fraction
    assert calls[1][0].fraction == 0.9 and calls[1][1]["proxy_tolerance"] == 0.01
    assert rep.budget_met is True
    # nothing else in search/ or pipeline/ measures candidates against the dense model
    import pathlib

    import autoprune

    root = pathlib.Path(autoprune.__file__).parent
    users = sorted(str(p.relative_to(root)) for d in ("_search", "pipeline")
                   for p in (root / d).glob("*.py") if "measure_ratio(" in p.read_text())
    assert users == ["_search/_finalists.py", "pipeline/_anchor.py"]


def test_fraction_budget_with_another_storage_reads_no_journal(syn, tmp_path):
    """The old pipeline reopened the study from the default journal; with another storage it
    read an empty file. Finalists now come from the trials' plan_json."""
    from autoprune.pipeline import SearchConfig, run_pipeline

    s = syn
    db = tmp_path / "study.db"
    run_dir = tmp_path / "run"
    rep = run_pipeline(s["model"], s["x"], budget_fraction=0.9, device="synthetic",
                       run_dir=run_dir, table=s["table"], predictor=s["predict_ms"],
                       search_config=SearchConfig(n_trials=6, storage=f"sqlite:///{db}"),
                       finetune_epochs=0, export=False, progress=False)
    assert db.stat().st_size > 0
    assert not list(run_dir.rglob("*.journal"))
    fin = pd.read_csv(run_dir / "finalists.csv")
    assert len(fin) >= 1 and fin["chosen"].sum() == 1
    assert (fin.loc[fin["chosen"], "measured_ratio"] <= 0.9 * (1 - 0.05)).all()
    assert rep.plan.to_json(indent=None) == fin.loc[fin["chosen"], "plan"].iloc[0]


def test_candidate_order_and_choice_rule():
    from autoprune._search import Finalists, candidate_order

    trials = pd.DataFrame({
        "trial": [0, 1, 2, 3, 4, 5],
        "proxy": [0.90, 0.95, 0.949, 0.50, 0.80, 0.95],
        "predicted_latency_ms": [0.4, 0.9, 1.0, 0.1, 0.3, 0.9],
        "feasible": [True] * 6,
        "state": ["COMPLETE"] * 6,
        "plan_json": ["a", "b", "c", "d", "e", "b"],  # trial 5 repeats trial 1's plan
    })
    order = candidate_order(trials, proxy_tolerance=0.0)
    assert order["trial"].tolist()[0] == 1 and 5 not in order["trial"].tolist()
    assert order["role"].iloc[0] == "best"
    assert set(order["role"]) <= {"best", "knee", "next"}
    knee = order[order["role"] == "knee"]["trial"].tolist()
    assert len(knee) <= 1 and order["trial"].tolist()[1:2] == (knee or [2])
    tol = candidate_order(trials, proxy_tolerance=0.01)["trial"].tolist()
    assert tol[:2] == [2, 1]  # ties within 0.01: larger predicted latency first
    with pytest.raises(InvalidInputError, match="proxy_tolerance"):
        candidate_order(trials, proxy_tolerance=-1)
    assert Finalists(pd.DataFrame({"trial": [3], "chosen": [True]}), None).chosen_trial == 3


def test_refined_trials_come_first_and_are_chosen():
    """candidate_order puts trials with a refined proxy first, ordered by it; the refined
    proxy is what finalists report and what picks the chosen plan."""
    from autoprune._search import REFINED_COLUMN, candidate_order

    trials = pd.DataFrame({
        "trial": [0, 1, 2, 3],
        "proxy": [0.90, 0.80, 0.70, 0.95],
        "predicted_latency_ms": [0.5, 0.6, 0.4, 0.3],
        "feasible": [True] * 4,
        "state": ["COMPLETE"] * 4,
        "plan_json": ["a", "b", "c", "d"],
        REFINED_COLUMN: [0.40, 0.60, np.nan, np.nan],
    })
    order = candidate_order(trials)
    # refined trials first by the refined proxy (1 beats 0 although its cheap proxy is lower),
    # then the unrefined ones by the usual rule (3 has the best cheap proxy)
    assert order["trial"].tolist()[:2] == [1, 0]
    assert order["role"].tolist()[:2] == ["refined", "refined"]
    assert order["trial"].tolist()[2] == 3 and order["role"].tolist()[2] == "best"
    # without any refined value the column changes nothing
    plain = candidate_order(trials.assign(**{REFINED_COLUMN: np.nan}))
    assert plain["trial"].tolist() == candidate_order(trials.drop(columns=REFINED_COLUMN))[
        "trial"].tolist()


def test_refine_proxies_scores_the_best_distinct_feasible_plans(syn):
    from autoprune._search import REFINED_COLUMN, refine_proxies

    s = syn
    result = _syn_search(s, verify_finalists=False)
    seen = []

    def costly(model) -> float:
        seen.append(sum(p.numel() for p in model.parameters()))
        return float(len(seen))  # a distinct score per call, in call order

    out = refine_proxies(result.trials, s["model"], s["x"], s["spec"], costly, top_k=3)
    refined = out[out[REFINED_COLUMN].notna()]
    ok = result.trials[result.trials["feasible"].astype(bool) & result.trials["proxy"].notna()]
    best = ok.sort_values(["proxy", "predicted_latency_ms"], ascending=[False, False],
                          kind="stable").drop_duplicates("plan_json").head(3)["plan_json"]
    assert set(refined["plan_json"]) == set(best) and len(seen) == min(3, len(best))
    assert len(out) == len(result.trials) and REFINED_COLUMN not in result.trials
    with pytest.raises(InvalidInputError, match="refine_top_k"):
        refine_proxies(result.trials, s["model"], s["x"], s["spec"], costly, top_k=0)
    with pytest.raises(InvalidInputError, match="finite"):
        refine_proxies(result.trials, s["model"], s["x"], s["spec"], lambda m: float("nan"))


def test_search_with_a_refine_evaluator_chooses_a_refined_plan(syn):
    s = syn
    from autoprune.budget import Budget

    calls = []

    def costly(model) -> float:
        calls.append(1)
        return -sum(p.numel() for p in model.parameters())  # prefers the smallest plan

    result = _syn_search(s, refine_evaluator=costly, refine_top_k=4,
                         finalist_budget=Budget.of(latency_budget_ms=1.0))
    fin = result.finalists
    assert 1 <= len(calls) <= 4
    assert fin["role"].iloc[0] == "refined" and result.best_plan is not None
    chosen = fin[fin["chosen"].astype(bool)]
    assert chosen["role"].iloc[0] == "refined"
    # the chosen plan has the best refined proxy among the refined finalists that met the budget
    ok = fin[(fin["role"] == "refined") & fin["meets_budget"].astype(bool)]
    assert chosen["proxy"].iloc[0] == ok["proxy"].max()


def test_after_a_miss_the_next_finalist_is_the_best_expected_to_fit(syn):
    """The latency model under-predicts every plan by the same factor: the best-proxy plan
    misses the budget, and the next one measured is the best plan that the observed error says
    fits (here the largest such plan), not the knee of the front further down."""
    from autoprune._search import select_finalists
    from autoprune.budget import Budget
    from autoprune.executor import apply_plan
    from autoprune.plan import PruningPlan

    s = syn
    keeps = [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.3]
    plans = [PruningPlan.uniform(s["spec"], k, alignment=1) for k in keeps]
    # what the synthetic device measures (deterministic: no noise)
    true = [s["backend"].measure_ratio(apply_plan(s["model"], p, s["x"], spec=s["spec"]),
                                       s["model"], s["x"])[0] for p in plans]
    assert true == sorted(true, reverse=True)
    budget, under = 0.85, 0.8  # predicted = 0.8 x what the device measures
    trials = pd.DataFrame({
        # proxy falls steeply, then flattens: the front's knee sits well below the budget
        "trial": range(len(plans)), "proxy": [0.3 + 0.6 * k ** 3 for k in keeps],
        "predicted_latency_ms": [under * t * s["dense_ms"] for t in true],
        "feasible": [under * t <= budget for t in true], "state": ["COMPLETE"] * len(plans),
        "plan_json": [p.to_json(indent=None) for p in plans],
    })
    with pytest.warns(UserWarning, match="trying the next candidate"):
        fin = select_finalists(trials, s["model"], s["x"], s["spec"], s["backend"],
                               Budget.of(budget_fraction=budget), n_finalists=1,
                               dense_ms=s["dense_ms"])
    table = fin.table
    fits = [i for i, t in enumerate(true) if t <= budget]
    assert fits and fits[0] > 0 and not table["meets_budget"].iloc[0]
    assert fin.chosen_trial == fits[0], (table[["trial", "role", "measured_ratio"]], true)
    assert len(table) == 2  # one miss, then the recalibrated choice
