"""SensitivityProxy: per-group drops measured once, a plan scored by their sum, the table on
disk, and search(importance=...) walking the greedy path by it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _latency_helpers import synthetic_conv1d

import autoprune as ap
from autoprune._search._sensitivity import SensitivityProxy
from autoprune.errors import CorruptFileError, InvalidInputError
from autoprune.plan import GroupPlan, PruningPlan
from autoprune.space import SearchSpace
from autoprune.types import Structure


@pytest.fixture(scope="module")
def syn():
    s = synthetic_conv1d(width=32)
    s["space"] = SearchSpace.from_spec(s["spec"], s["table"], s["backend"])
    s["channel"] = [c for c in s["space"].searchable_groups if c.kind == "channel"]
    return s


def _known_proxy(s, fragile: str):
    """A plan scorer whose truth is known: 1 minus 0.5 x the pruned share of ``fragile`` and
    0.01 x the pruned share of every other channel group (noise-free)."""
    spec = s["spec"]
    calls: list[PruningPlan] = []

    def score(plan: PruningPlan) -> float:
        calls.append(plan)
        kept = spec.kept_units(plan)
        loss = 0.0
        for c in s["channel"]:
            cut = 1.0 - kept.get(c.name, c.units) / c.units
            loss += (0.5 if c.name == fragile else 0.01) * cut
        return 1.0 - loss

    return score, calls


def test_scores_a_plan_by_the_sum_of_single_group_drops(syn):
    s = syn
    assert len(s["channel"]) >= 2
    fragile, other = s["channel"][0], s["channel"][1]
    score, calls = _known_proxy(s, fragile.name)
    sens = SensitivityProxy(s["space"], score).fit()
    assert sens.n_evaluations_ == len(calls) == len(sens.plans()) + 1
    # every measured plan prunes exactly one group, the narrowest width of the space included
    rows = sens.table_[sens.table_["structure"] == "channel"]
    for c in s["channel"]:
        assert min(rows.loc[rows["group"] == c.name, "units"]) == c.widths[0]
    assert sens.evaluate_plan(s["space"].dense_plan()) == pytest.approx(1.0)
    # the proxy is additive, so the sum of measured drops reproduces it on measured widths
    # and interpolates between them (linear in units, as the truth)
    plan = PruningPlan.uniform(s["spec"], 0.5, alignment=1)
    assert sens.evaluate_plan(plan) == pytest.approx(score(plan), abs=0.02)
    one = s["space"].decode({f"keep:{fragile.name}": 0})
    two = s["space"].decode({f"keep:{other.name}": 0})
    assert sens.drop(one) > 10 * sens.drop(two) > 0


def test_drops_never_shrink_as_a_group_narrows_and_never_go_negative(syn):
    s = syn
    c = s["channel"][0]
    rng = np.random.default_rng(0)

    def noisy(plan: PruningPlan) -> float:  # no signal: noise only
        return 0.5 + float(rng.normal(0, 0.01))

    sens = SensitivityProxy(s["space"], noisy).fit()
    scores = [sens.drop(s["space"].decode({f"keep:{c.name}": i})) for i in range(len(c.widths))]
    assert all(d >= 0 for d in scores)
    assert all(a >= b - 1e-12 for a, b in zip(scores, scores[1:]))  # narrower: drop >= wider


def test_saved_table_round_trips_and_bad_files_name_themselves(syn, tmp_path):
    s = syn
    score, _ = _known_proxy(s, s["channel"][0].name)
    sens = SensitivityProxy(s["space"], score).fit()
    path = sens.save(tmp_path / "sensitivity.csv")
    again = SensitivityProxy(s["space"]).load(path)
    plans = [s["space"].uniform_plan(r) for r in (0.9, 0.6, 0.3)]
    assert [again.evaluate_plan(p) for p in plans] == pytest.approx(
        [sens.evaluate_plan(p) for p in plans])
    assert again.n_evaluations_ == 0 and "largest drops" in repr(again)

    bad = tmp_path / "bad.csv"
    bad.write_text("not,a\ntable,here\n")
    with pytest.raises(CorruptFileError, match="bad.csv"):
        SensitivityProxy(s["space"]).load(bad)
    other = tmp_path / "other.csv"
    t = pd.read_csv(path, keep_default_na=False)
    t["model_fingerprint"] = "0123"
    t.to_csv(other, index=False)
    with pytest.raises(InvalidInputError, match="another model"):
        SensitivityProxy(s["space"]).load(other)


def test_unmeasured_decisions_raise_instead_of_scoring_zero(syn):
    s = syn
    score, _ = _known_proxy(s, s["channel"][0].name)
    sens = SensitivityProxy(s["space"], score).fit()
    plan = s["space"].dense_plan()
    plan.groups[s["channel"][0].name] = GroupPlan(Structure.UNSTRUCTURED, 0.5)
    with pytest.raises(InvalidInputError, match="unstructured"):
        sens.evaluate_plan(plan)
    with pytest.raises(InvalidInputError, match="not fitted"):
        SensitivityProxy(s["space"]).evaluate_plan(plan)
    with pytest.raises(InvalidInputError, match="proxy="):
        SensitivityProxy(s["space"]).fit()


def test_search_walks_the_greedy_path_by_measured_sensitivity(syn, tmp_path):
    """The group the magnitude-guided greedy narrows is made fragile for the evaluator: with
    importance=<table path> the greedy plan keeps it at full width, and a second search
    reuses the measured table instead of measuring again."""
    s = syn
    calls = []
    state = {}

    def evaluator(model) -> float:
        calls.append(1)
        mods = dict(model.named_modules())
        if "prod" not in state:
            return 1.0
        kept = mods[state["prod"]].weight.shape[0]
        n = sum(p.numel() for p in model.parameters())
        return 1.0 - 0.5 * (1 - kept / state["full"]) + 1e-9 * n

    def greedy_plan(**kw):
        r = ap.search(s["model"], s["x"], device=s["backend"],
                      latency_budget_ms=0.75 * s["dense_ms"], table=s["table"],
                      predictor=s["predict_ms"], spec=s["spec"], n_trials=1,
                      strategy="greedy", progress=False, verify_finalists=False,
                      evaluator=evaluator, **kw)
        return s["spec"].kept_units(r.best_plan)

    by_magnitude = greedy_plan(importance="magnitude")
    narrowed = [c for c in s["channel"] if by_magnitude.get(c.name, c.units) < c.units]
    assert narrowed
    fragile = narrowed[0]
    state["prod"] = s["spec"].groups[fragile.name].producers[0]
    state["full"] = fragile.units
    path = tmp_path / "sens.csv"
    calls.clear()
    by_sensitivity = greedy_plan(importance=path)
    assert path.exists()
    measured = len(calls)
    assert by_sensitivity.get(fragile.name, fragile.units) == fragile.units  # 50x any other drop
    assert greedy_plan(importance=path) == by_sensitivity
    assert len(calls) - measured < measured  # the table was loaded, not measured again
    with pytest.raises(InvalidInputError, match="evaluator="):
        ap.search(s["model"], s["x"], device=s["backend"],
                  latency_budget_ms=0.75 * s["dense_ms"], table=s["table"],
                  predictor=s["predict_ms"], spec=s["spec"], n_trials=1, progress=False,
                  importance=tmp_path / "none.csv")
    with pytest.raises(InvalidInputError, match="importance must be"):
        ap.search(s["model"], s["x"], device=s["backend"],
                  latency_budget_ms=0.75 * s["dense_ms"], table=s["table"],
                  predictor=s["predict_ms"], spec=s["spec"], n_trials=1, progress=False,
                  importance=3)
