"""run_pipeline end to end on digits (real ONNX Runtime timings), resume, CLI helpers."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from autoprune.errors import InvalidInputError


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(256, 10),
    )


@pytest.fixture(scope="module")
def trained():
    from autoprune._finetune import finetune
    from autoprune.data import digits_tensors

    torch.manual_seed(0)
    train, test = digits_tensors(size=32, channels=3)
    train = Subset(train, range(640))
    g = torch.Generator().manual_seed(0)
    train_loader = DataLoader(train, batch_size=32, shuffle=True, generator=g)
    test_loader = DataLoader(test, batch_size=256)
    model = _cnn()
    finetune(model, train_loader, epochs=2, lr=0.1, progress=False)
    return model.eval(), train_loader, test_loader


def test_pipeline_meets_measured_budget_and_resumes(trained, tmp_path, tmp_tables, monkeypatch):
    from autoprune.pipeline import Step, load_pruned, run_pipeline

    model, train_loader, test_loader = trained
    x = torch.randn(1, 3, 32, 32)
    kw = dict(budget_fraction=0.6, run_dir=tmp_path / "run", train_loader=train_loader,
              val_loader=test_loader, n_trials=8, predictor_samples=16, finetune_epochs=1,
              tables_root=tmp_tables, progress=False)
    rep = run_pipeline(model, x, **kw)
    assert all(v == "ran" for v in rep.steps.values()), rep.steps
    # the measured (paired) latency meets the budget, and the report says so with numbers
    v = rep.verify
    assert v is not None and v.ratio is not None and v.reference is not None
    assert rep.budget_met is True
    assert v.ratio <= 0.6
    assert rep.budget_ms == pytest.approx(0.6 * v.reference.median_ms)
    assert rep.budget_used == pytest.approx(v.ratio / 0.6) and 0 < rep.budget_used <= 1
    assert rep.accuracy_dense is not None and rep.accuracy_dense > 0.5
    assert rep.accuracy_pruned is not None and 0.0 <= rep.accuracy_pruned <= 1.0
    assert rep.macs_pruned < rep.macs_dense and rep.predicted_ms is not None
    text = (tmp_path / "run" / "report.txt").read_text()
    assert "paired ratio" in text and "accuracy pruned" in text and "MET" in text
    assert f"{rep.budget_used:.0%} of the budget used" in text
    for name in ("state.json", "spec.json", "plan.json", "pruned.pt", "predictor.csv",
                 "trials.csv", "finalists.csv", "verify.json", "model.onnx", "report.json",
                 "front.png"):
        assert (tmp_path / "run" / name).exists(), name
    assert (tmp_path / "run" / "search" / "study.journal").exists()
    # fine-tune checkpoints are kept per plan (a rerun search may choose another plan)
    import hashlib

    plan_id = hashlib.sha256(rep.plan.to_json(indent=None).encode()).hexdigest()[:12]
    assert [p.name for p in (tmp_path / "run" / "finetune").iterdir()] == [plan_id]
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["budget_met"] is True and saved["accuracy_pruned"] == rep.accuracy_pruned
    assert saved["budget_used"] == pytest.approx(rep.budget_used)

    # rebuild = apply_plan(fresh model, plan) + load_state_dict: same outputs
    fresh = _cnn()
    fresh.load_state_dict(model.state_dict())
    rebuilt = load_pruned(fresh, tmp_path / "run", x)
    torch.testing.assert_close(rebuilt(x), rep.model.eval()(x))

    # a rerun skips every completed step and gives the same numbers
    rep2 = run_pipeline(model, x, **kw)
    for step in (Step.PROFILE, Step.PREDICTOR, Step.SEARCH, Step.FINETUNE, Step.VERIFY,
                 Step.EXPORT):
        assert rep2.steps[step.value].startswith("skipped"), rep2.steps
    assert rep2.accuracy_pruned == rep.accuracy_pruned
    assert rep2.verify is not None and rep2.verify.ratio == v.ratio
    assert rep2.plan.to_dict() == rep.plan.to_dict()

    # a search interrupted after its study was written resumes with the budget the study was
    # made for (the anchor is measured once and kept in state.json, not re-measured)
    state_path = tmp_path / "run" / "state.json"
    st = json.loads(state_path.read_text())
    assert st["values"]["search_budget_ms"] > 0
    n_trials_before = len((tmp_path / "run" / "trials.csv").read_text().splitlines())
    st["completed"] = [c for c in st["completed"] if c in ("analyze", "profile", "predictor")]
    state_path.write_text(json.dumps(st))
    (tmp_path / "run" / "plan.json").unlink()
    import autoprune.pipeline._anchor as anchor_module

    def remeasure(*_a, **_k):  # noise can flip a bisection step: a new budget, a refused study
        raise AssertionError("the anchor was measured again on resume")

    monkeypatch.setattr(anchor_module, "anchor_budget_ms", remeasure)
    rep3 = run_pipeline(model, x, **kw)
    assert rep3.steps["search"] == "ran"
    assert len((tmp_path / "run" / "trials.csv").read_text().splitlines()) == n_trials_before

    # the same run_dir with another budget is refused
    with pytest.raises(InvalidInputError, match="other settings"):
        run_pipeline(model, x, **{**kw, "budget_fraction": 0.4})


def test_pipeline_with_given_plan_skips_search(trained, tmp_path):
    from autoprune._analyze import analyze
    from autoprune.pipeline import run_pipeline
    from autoprune.plan import PruningPlan

    model, train_loader, test_loader = trained
    x = torch.randn(1, 3, 32, 32)
    plan = PruningPlan.uniform(analyze(model, x), keep_ratio=0.5, alignment=16)
    rep = run_pipeline(model, x, latency_budget_ms=1e3, plan=plan, run_dir=tmp_path / "r",
                       train_loader=train_loader, val_loader=test_loader, finetune_epochs=0,
                       export=False, progress=False)
    assert rep.steps["search"] == "skipped (plan given)"
    assert rep.steps["finetune"].startswith("skipped")
    assert rep.budget_met is True and rep.verify is not None and rep.verify.ratio < 1.0
    assert rep.budget_used == pytest.approx(rep.verify.latency_ms / 1e3)
    assert rep.plan.to_dict() == plan.to_dict()


def test_pipeline_argument_checks(tmp_path):
    from autoprune.pipeline import run_pipeline

    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(InvalidInputError, match="exactly one"):
        run_pipeline(_cnn(), x, run_dir=tmp_path, finetune_epochs=0)
    with pytest.raises(InvalidInputError, match="budget_fraction"):
        run_pipeline(_cnn(), x, budget_fraction=1.5, run_dir=tmp_path, finetune_epochs=0)
    with pytest.raises(InvalidInputError, match="train_loader"):
        run_pipeline(_cnn(), x, latency_budget_ms=1.0, run_dir=tmp_path)
    from autoprune.pipeline import SearchConfig

    # the refined proxy fine-tunes and scores: without loaders it is refused before any work
    with pytest.raises(InvalidInputError, match="refine_top_k needs train_loader and val_loader"):
        run_pipeline(_cnn(), x, latency_budget_ms=1.0, run_dir=tmp_path / "r", finetune_epochs=0,
                     search_config=SearchConfig(refine_top_k=4))
    assert not (tmp_path / "r").exists()
    with pytest.raises(InvalidInputError, match="refine_top_k"):
        SearchConfig(refine_top_k=-1)
    with pytest.raises(InvalidInputError, match="refine_finetune_steps"):
        SearchConfig(refine_finetune_steps=0)


def test_cli_helpers():
    from autoprune.cli.common import load_model, parse_shape

    assert parse_shape("1,3,32,32") == (1, 3, 32, 32)
    with pytest.raises(InvalidInputError, match="input-shape"):
        parse_shape("1,a")
    m = load_model("autoprune.zoo:conv1d_net", '{"width": 16}')
    assert m(torch.randn(2, 1, 40)).shape == (2, 10)
    with pytest.raises(InvalidInputError, match="module:callable"):
        load_model("resnet18")
    with pytest.raises(InvalidInputError, match="no attribute"):
        load_model("autoprune.zoo:nope")


def test_anchor_budget_is_the_widest_uniform_plan_that_measures_within_the_fraction():
    """The budget fraction becomes predicted ms through a measured uniform plan; a plan one
    bisection step wider measures over the fraction (on the deterministic synthetic device)."""
    from types import SimpleNamespace

    from _latency_helpers import synthetic_conv1d

    from autoprune.executor import apply_plan
    from autoprune.pipeline import anchor_budget_ms

    s = synthetic_conv1d(width=64)
    predictor = SimpleNamespace(predict=s["predict_ms"])
    a = anchor_budget_ms(s["model"], s["x"], s["spec"], s["table"], s["backend"], predictor,
                         0.5, iters=6)
    assert a is not None and a.measured_ratio <= 0.5 < a.over_ratio
    assert a.plan_ms == pytest.approx(s["predict_ms"](a.plan))
    # the budget is interpolated at the fraction between the fitting plan and the narrowest
    # one measured over it: above the fitting plan's prediction, as far as the ratios say
    assert a.plan_ms < a.budget_ms
    share = (0.5 - a.measured_ratio) / (a.over_ratio - a.measured_ratio)
    assert a.over_plan is not None and 0 < share < 1
    over_ms = s["predict_ms"](a.over_plan)
    assert a.budget_ms == pytest.approx(a.plan_ms + share * (over_ms - a.plan_ms))
    assert 0 < a.keep_ratio < 1 and a.budget_ms < s["dense_ms"]
    ratios = {round(gp.keep_ratio, 2) for gp in a.plan.groups.values()}
    assert len(ratios) <= 2  # one keep ratio for all groups, up to width-grid rounding
    # nothing fits below the narrowest plan: None, not a plan that misses
    assert anchor_budget_ms(s["model"], s["x"], s["spec"], s["table"], s["backend"], predictor,
                            1e-4, iters=3) is None
    wider = a.keep_ratio + 1 / 64
    from autoprune.space import SearchSpace

    plan = SearchSpace.from_spec(s["spec"], s["table"], s["backend"]).uniform_plan(wider)
    pruned = apply_plan(s["model"], plan, s["x"], spec=s["spec"]).eval()
    r, _ = s["backend"].measure_ratio(pruned, s["model"].eval(), s["x"])
    assert r > 0.5 or plan.to_dict() == a.plan.to_dict()


def test_candidate_order_prefers_the_larger_plan_among_proxy_ties():
    import pandas as pd

    from autoprune.pipeline import candidate_order

    trials = pd.DataFrame({
        "trial": [0, 1, 2, 3, 4, 5],
        "proxy": [0.950, 0.955, 0.948, 0.90, 0.91, None],
        "predicted_latency_ms": [1.0, 0.6, 1.2, 1.5, 0.5, 1.1],
        "feasible": [True, True, True, True, True, True],
    })
    trials.loc[3, "feasible"] = False
    order = candidate_order(trials, proxy_tolerance=0.01)["trial"].tolist()
    # within 0.01 of the best (0.955): 2, 0, 1 by predicted latency, largest first; then 4;
    # the infeasible trial 3 and the failed trial 5 are never candidates
    assert order == [2, 0, 1, 4]
    assert candidate_order(trials, proxy_tolerance=0.0)["trial"].tolist() == [1, 0, 2, 4]
    assert candidate_order(trials[trials["trial"] == 3]).empty


def test_run_state_step_times_completes_and_resumes(tmp_path):
    from autoprune.errors import CorruptFileError
    from autoprune.pipeline import RunState, Step

    art = tmp_path / "verify.json"
    st = RunState.load(tmp_path)
    with st.step(Step.VERIFY, artefact=art) as run:
        assert not run.resumed
        art.write_text("{}")
        run.record(answer=42)
    assert st.steps["verify"] == "ran" and st.seconds["verify"] >= 0
    with st.step(Step.EXPORT) as run:
        run.skip("export=False", complete=False)
    assert st.steps["export"] == "skipped (export=False)"
    with pytest.raises(RuntimeError), st.step(Step.FINETUNE) as run:
        raise RuntimeError("interrupted")
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["completed"] == ["verify"] and saved["values"]["answer"] == 42

    again = RunState.load(tmp_path)
    assert again.done(Step.VERIFY) and not again.done(Step.FINETUNE)
    with again.step(Step.VERIFY, artefact=art) as run:
        assert run.resumed
    assert again.steps["verify"] == "skipped (done: verify.json)"
    with again.step(Step.FINETUNE) as run:
        assert not run.resumed  # the interrupted step runs again
    art.unlink()  # a completed step whose artefact is gone runs again
    with again.step(Step.VERIFY, artefact=art) as run:
        assert not run.resumed
    with again.step(Step.ANALYZE, resumable=False) as run:
        assert not run.resumed
    with pytest.raises(InvalidInputError, match="pipeline Step"), again.step("verify"):
        pass
    (tmp_path / "state.json").write_text(json.dumps({"version": 99}))
    with pytest.raises(CorruptFileError, match="state version 99"):
        RunState.load(tmp_path)


def test_config_validation_errors_are_clear(tmp_path):
    from autoprune.pipeline import FinetuneOptions, SearchConfig, run_pipeline

    with pytest.raises(InvalidInputError, match="SearchConfig.n_trials must be an integer >= 1"):
        SearchConfig(n_trials=0)
    with pytest.raises(InvalidInputError, match="proxy_tolerance must be a finite number"):
        SearchConfig(proxy_tolerance=float("nan"))
    with pytest.raises(InvalidInputError, match="unknown search option 'trials'; SearchConfig "
                                                "has .*n_trials"):
        SearchConfig.from_options({"trials": 5})
    with pytest.raises(InvalidInputError, match=r"search_options\['evaluator'\] is set by the "
                                                r"pipeline; pass run_pipeline\(search_evaluator"):
        SearchConfig.from_options({"evaluator": len})
    assert SearchConfig.from_options({"strategy": "random"}, n_trials=7) == \
        SearchConfig(n_trials=7, strategy="random")
    with pytest.raises(InvalidInputError, match="FinetuneOptions.lr must be a finite number > 0"):
        FinetuneOptions(lr=-1.0)
    with pytest.raises(InvalidInputError, match="FinetuneOptions.epochs"):
        FinetuneOptions(epochs=-1)
    with pytest.raises(InvalidInputError, match=r"finetune_options\['epochs'\] is set by the "
                                                r"pipeline; pass FinetuneOptions\(epochs"):
        FinetuneOptions.from_options({"epochs": 2})
    with pytest.raises(InvalidInputError, match="unknown fine-tuning option 'learning_rate'"):
        FinetuneOptions.from_options({"learning_rate": 0.1})
    assert FinetuneOptions.from_options({"lr": 0.1}, epochs=2).finetune_kwargs() == {"lr": 0.1}
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(InvalidInputError, match="n_trials given beside search_config"):
        run_pipeline(_cnn(), x, latency_budget_ms=1.0, run_dir=tmp_path, n_trials=5,
                     search_config=SearchConfig(), finetune_epochs=0)
    with pytest.raises(InvalidInputError, match="finetune_epochs given beside finetune_config"):
        run_pipeline(_cnn(), x, latency_budget_ms=1.0, run_dir=tmp_path, finetune_epochs=0,
                     finetune_config=FinetuneOptions(epochs=0))
    with pytest.raises(InvalidInputError, match="unknown search option"):
        run_pipeline(_cnn(), x, latency_budget_ms=1.0, run_dir=tmp_path, finetune_epochs=0,
                     search_options={"n_trails": 3})
    assert not (tmp_path / "state.json").exists()  # refused before any work
