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
    budget = 0.7 * s["dense_ms"]
    result = _search(s, tmp_path, evaluator=ev, n_trials=10, latency_budget_ms=budget)
    assert result.best_plan is not None, result.notes
    fin = result.finalists
    chosen = fin[fin["chosen"]]
    assert len(chosen) == 1
    assert float(chosen["measured_latency_ms"].iloc[0]) <= budget
    assert float(result.best_trial["proxy"]) == float(chosen["proxy"].iloc[0])
    assert result.knee() is not None
    # every finalist that missed the budget is reported in the notes
    for n in fin.loc[~fin["meets_budget"], "trial"]:
        assert any(f"trial {n} " in note for note in result.notes)
    # an independent re-measurement agrees (shared, noisy CPU: 20% tolerance)
    pruned = ap.apply_plan(s["model"], result.best_plan, s["x"]).eval()
    ratio, _ = s["backend"].measure_ratio(pruned, copy.deepcopy(s["model"]).eval(), s["x"])
    assert ratio * result.dense_latency_ms <= 1.2 * budget
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
