"""Every latency model satisfies the ``LatencyModel`` protocol the same way.

A new latency model is one more entry in ``MODELS`` (a factory taking the shared set-up).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _latency_helpers import synthetic_conv1d

import autoprune as ap
from autoprune.latency import LatencyPredictor
from autoprune.latency._featurize import PlanFeaturizer
from autoprune.latency._model import (
    CallableLatencyModel,
    LatencyModel,
    TableLatencyModel,
    as_latency_model,
)
from autoprune.latency._sampler import PlanSampler
from autoprune.plan import PruningPlan


@pytest.fixture(scope="module")
def setup():
    return synthetic_conv1d()


def _predictor(s):
    plans = PlanSampler(s["spec"], 8).sample(np.random.default_rng(0), 30)
    feats = PlanFeaturizer(s["spec"], s["table"]).frame([p for _, p in plans])
    rows = pd.DataFrame({"plan_json": [p.to_json(indent=None) for _, p in plans],
                         "kind": [k for k, _ in plans],
                         "measured_ms": 1.2 * feats["table_ms"] + 0.01})
    return LatencyPredictor(random_state=0).fit(table=s["table"], spec=s["spec"], dataset=rows)


def _table_model(s):
    space = ap.SearchSpace.from_spec(s["spec"], s["table"], s["backend"])
    return TableLatencyModel(s["table"], s["spec"]).fit(
        s["model"], s["x"], s["backend"], [space.dense_plan(), space.fastest_plan(),
                                           space.uniform_plan(0.5)])


MODELS = {
    "predictor": _predictor,
    "table": _table_model,
    "callable": lambda s: as_latency_model(s["predict_ms"]),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request, setup):
    return MODELS[request.param](setup)


def _plans(spec, n=12):
    rng = np.random.default_rng(5)
    sampler = PlanSampler(spec, 8)
    return [sampler.plan_of_kind(k, rng) for k in ("space", "uniform_aligned",
                                                   "uniform_unaligned", "random_unaligned")
            for _ in range(n // 4)]


def test_satisfies_the_protocol(model):
    assert isinstance(model, LatencyModel)
    assert as_latency_model(model) is model


def test_prices_every_plan_positively_and_consistently(model, setup):
    plans = [PruningPlan.dense(setup["spec"]), *_plans(setup["spec"])]
    many = model.predict_many(plans)
    assert many.shape == (len(plans),) and np.all(np.isfinite(many)) and np.all(many > 0)
    assert model.predict(plans[3]) == pytest.approx(float(many[3]))
    assert len(model.predict_many([])) == 0


def test_interval_brackets_the_prediction(model, setup):
    plans = _plans(setup["spec"])
    lo, hi = model.predict_interval(plans)
    p = model.predict_many(plans)
    assert lo.shape == hi.shape == p.shape
    assert np.all(lo <= p + 1e-12) and np.all(p <= hi + 1e-12) and np.all(lo > 0)


def test_narrower_uniform_plans_are_not_priced_slower(model, setup):
    # on this device (no kernel regimes) latency grows with the uniform keep ratio
    spec = setup["spec"]
    ps = model.predict_many([PruningPlan.uniform(spec, r, alignment=8)
                             for r in (0.25, 0.5, 0.75, 1.0)])
    assert np.all(np.diff(ps) >= -1e-9), ps


def test_anything_else_is_refused_with_a_clear_error():
    with pytest.raises(ap.errors.InvalidInputError, match="LatencyModel"):
        as_latency_model(42)
    assert isinstance(as_latency_model(lambda plan: 1.0), CallableLatencyModel)


def test_fitted_dense_ms_is_dense_as_measured_during_the_fit(model):
    from autoprune.latency import fitted_dense_ms

    got = fitted_dense_ms(model)
    if isinstance(model, CallableLatencyModel):
        assert got is None  # a user's function measured nothing
    elif isinstance(model, TableLatencyModel):
        dense_anchor = max(model.anchors_)  # the dense plan has the largest table sum
        assert got == pytest.approx(dense_anchor[1])
    else:  # fitted on a dataset without the dense model timed beside each plan
        assert got is None


def test_fitted_dense_ms_of_a_paired_predictor_is_the_median_dense_over_chunks(setup):
    from autoprune.latency import fitted_dense_ms

    s = setup
    plans = PlanSampler(s["spec"], 8).sample(np.random.default_rng(1), 24)
    feats = PlanFeaturizer(s["spec"], s["table"]).frame([p for _, p in plans])
    chunk = np.arange(len(plans)) // 8
    rows = pd.DataFrame({"plan_json": [p.to_json(indent=None) for _, p in plans],
                         "kind": [k for k, _ in plans], "chunk": chunk,
                         "ref_ms": np.array([2.0, 3.0, 5.0])[chunk],
                         "measured_ms": 1.2 * feats["table_ms"] + 0.01})
    fitted = LatencyPredictor(random_state=0).fit(table=s["table"], spec=s["spec"], dataset=rows)
    assert fitted_dense_ms(fitted) == pytest.approx(3.0)
