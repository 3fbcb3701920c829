"""The pipeline's closed loop on the measured budget use (``SearchConfig(budget_rounds=2)``): a
chosen plan that measures well under the budget makes the search run once more at a budget
scaled by that measurement (issue 13)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from autoprune.budget import Budget
from autoprune.pipeline import _anchor
from autoprune.pipeline._anchor import (
    budget_use,
    keep_second,
    second_round_budget_ms,
)


def _finalists(ratio: float, proxy: float, chosen: bool = True, ms: float = float("nan")
               ) -> pd.DataFrame:
    return pd.DataFrame([{"trial": 0, "proxy": proxy, "measured_ratio": ratio,
                          "measured_latency_ms": ms, "chosen": chosen}])


def test_budget_use_fraction_ms_and_nothing_chosen():
    b = Budget.of(budget_fraction=0.5, headroom=0.05)
    assert budget_use(_finalists(0.38, 0.7), b) == pytest.approx(0.38 / (0.5 * 0.95))
    assert budget_use(_finalists(0.3, 0.7, ms=4.0), Budget.of(latency_budget_ms=5.0)) \
        == pytest.approx(0.8)
    assert math.isnan(budget_use(_finalists(0.3, 0.7, chosen=False), b))
    assert math.isnan(budget_use(pd.DataFrame(), b))


def test_second_round_budget_scales_by_measurement_and_is_capped():
    assert second_round_budget_ms(2.0, 0.8) == pytest.approx(2.5)
    assert second_round_budget_ms(2.0, 0.96) is None  # used enough
    assert second_round_budget_ms(2.0, 0.2) == pytest.approx(3.0)  # at most 1.5x
    assert second_round_budget_ms(2.0, float("nan")) is None


def test_keep_second_needs_a_measured_choice_with_as_good_a_proxy():
    first = _finalists(0.3, 0.60)
    assert keep_second(first, _finalists(0.34, 0.62))
    assert keep_second(first, _finalists(0.34, 0.60))
    assert not keep_second(first, _finalists(0.34, 0.55))
    assert not keep_second(first, _finalists(0.5, 0.9, chosen=False))  # missed the budget
    assert keep_second(_finalists(0.3, 0.6, chosen=False), _finalists(0.34, 0.5))


class _FakeSearch:
    """Stands in for ``autoprune.search``: records each call's budget and returns a result whose
    chosen plan measured ``ratios[call]`` with proxy ``proxies[call]``."""

    def __init__(self, plans, ratios, proxies):
        self.plans, self.ratios, self.proxies = plans, ratios, proxies
        self.calls: list[tuple[float, str, int]] = []

    def __call__(self, model, args, *, latency_budget_ms, run_dir, n_trials, **_kw):
        i = len(self.calls)
        self.calls.append((latency_budget_ms, run_dir.name, n_trials))
        fin = _finalists(self.ratios[i], self.proxies[i])
        return SimpleNamespace(best_plan=self.plans[i], finalists=fin,
                               trials=pd.DataFrame({"trial": [0]}), notes=[],
                               plot=lambda path: None)


@pytest.mark.parametrize("ratios, proxies, calls, kept", [
    ((0.36, 0.44), (0.60, 0.65), 2, 1),   # used 76%: searched again, the wider plan kept
    ((0.36, 0.44), (0.60, 0.50), 2, 0),   # searched again, its proxy worse: the first stays
    ((0.465, 0.0), (0.60, 0.0), 1, 0),    # used 98%: no second search
])
def test_search_step_searches_again_when_the_budget_is_underused(tmp_path, monkeypatch, ratios,
                                                                 proxies, calls, kept):
    import autoprune._search as search_pkg
    from autoprune._analyze import analyze
    from autoprune.pipeline import RunState, SearchConfig
    from autoprune.pipeline._run import _search_step
    from autoprune.plan import PruningPlan

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16),
                                torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3))
    x = (torch.randn(1, 3, 16, 16),)
    spec = analyze(model, x)
    plans = [PruningPlan.uniform(spec, keep_ratio=k, alignment=1) for k in (0.5, 0.75)]
    fake = _FakeSearch(plans, ratios, proxies)
    monkeypatch.setattr(search_pkg, "search", fake)
    monkeypatch.setattr(_anchor, "anchor_budget_ms",
                        lambda *a, **k: SimpleNamespace(budget_ms=2.0))
    budget = Budget.of(budget_fraction=0.5, headroom=0.05)
    state = RunState(tmp_path)
    sc = SearchConfig(n_trials=10, budget_rounds=2)
    plan, _ = _search_step(model, x, spec, None, None, lambda p: 1.0, budget, sc, state,
                           tmp_path, lambda m: 0.0, None, None, 0, False, lambda msg: None)
    assert len(fake.calls) == calls
    assert fake.calls[0] == (pytest.approx(2.0), "search", 10)
    if calls == 2:
        use = ratios[0] / 0.475
        assert fake.calls[1] == (pytest.approx(2.0 / use), "search_2", 5)
        assert state.get("search_round_kept") == kept + 1
    assert plan is plans[kept]


def test_budget_rounds_is_off_by_default_and_validated():
    from autoprune.errors import InvalidInputError
    from autoprune.pipeline import SearchConfig

    assert SearchConfig().budget_rounds == 1
    assert "budget_rounds" not in SearchConfig().search_kwargs()
    with pytest.raises(InvalidInputError, match="budget_rounds"):
        SearchConfig(budget_rounds=3)
    with pytest.raises(InvalidInputError, match="budget_rounds"):
        SearchConfig(budget_rounds=0)
