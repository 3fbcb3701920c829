"""``anchor_budget_ms``: a budget given as a share of dense latency becomes predicted
milliseconds by measurement (the widest uniform plan whose paired ratio fits); ``budget_use``
and ``second_round_budget_ms``: when the chosen plan then measures well under the budget (the
latency model prices the search's plans differently from the uniform anchor), the search is
repeated once at a budget scaled by measurement (closed loop)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autoprune.plan import PruningPlan

if TYPE_CHECKING:
    import pandas as pd
    from torch import nn

    from autoprune.budget import Budget
    from autoprune.types import ModelSpec


@dataclass(frozen=True)
class BudgetAnchor:
    """The widest uniform plan measured within a budget fraction, and the search budget in
    predicted milliseconds derived from it (``budget_ms``; see :func:`anchor_budget_ms`).
    ``plan_ms``: that plan's own predicted latency. ``over_plan``/``over_ratio``: the narrowest
    uniform plan measured *over* the fraction and its measured ratio (None/NaN if none was)."""

    budget_ms: float
    keep_ratio: float
    measured_ratio: float
    ratio_iqr: float
    plan: PruningPlan
    plan_ms: float = float("nan")
    over_ratio: float = float("nan")
    over_plan: PruningPlan | None = None


def anchor_budget_ms(model: nn.Module, args: tuple[Any, ...], spec: ModelSpec, table: Any,
                     backend: Any, predictor: Any, fraction: float,
                     space_options: dict[str, Any] | None = None, iters: int = 6,
                     ) -> BudgetAnchor | None:
    """Translate a budget given as a share of dense latency into predicted milliseconds by
    measurement: bisect the keep ratio of a uniform plan on the space's width grid, timing each
    against dense (paired ratio), until the widest plan measured at most ``fraction`` and the
    narrowest measured over it bracket the fraction. The search budget is interpolated between
    the two plans' predicted latencies at ``fraction`` on their measured ratios (the predictor's
    own bias at that size cancels; a budget from the widest fitting plan alone left up to a
    third of the allowed latency unused: issue 13), and never below the fitting plan's
    prediction. The uniform plan itself is in the search (a warm start), so the search has to
    beat it on the proxy. None if even the narrowest uniform plan measured does not fit."""
    from autoprune.executor import apply_plan
    from autoprune.space import SearchSpace

    space = SearchSpace.from_spec(spec, table, backend, **(space_options or {}))
    dense = copy.deepcopy(model).eval()
    best: tuple[float, PruningPlan, float, float] | None = None  # keep, plan, ratio, iqr
    over: tuple[float, PruningPlan, float] | None = None  # narrowest plan over the fraction
    lo, hi = 0.0, 1.0
    for _ in range(max(1, iters)):
        r = 0.5 * (lo + hi)
        plan = space.uniform_plan(max(r, 1e-3))
        pruned = apply_plan(model, plan, args, spec=spec).eval()
        ratio, iqr = backend.measure_ratio(pruned, dense, args)
        if float(ratio) <= fraction:
            if best is None or r > best[0]:
                best = (r, plan, float(ratio), float(iqr))
            lo = r
        else:
            if over is None or r < over[0]:
                over = (r, plan, float(ratio))
            hi = r
    if best is None:
        return None
    keep, plan, ratio, iqr = best
    plan_ms = float(predictor.predict(plan))
    budget_ms, over_ratio, over_plan = plan_ms, float("nan"), None
    if over is not None:
        over_plan = over[1]
        over_ratio = over[2]
        over_ms = float(predictor.predict(over[1]))
        if over_ratio > ratio and over_ms > plan_ms:
            t = (fraction - ratio) / (over_ratio - ratio)
            budget_ms = plan_ms + min(max(t, 0.0), 1.0) * (over_ms - plan_ms)
    return BudgetAnchor(budget_ms, keep, ratio, iqr, plan, plan_ms, over_ratio, over_plan)


#: a chosen plan measured under this share of its budget triggers a second search
MIN_BUDGET_USE = 0.95
#: the second search's budget is at most this many times the first's
MAX_BUDGET_SCALE = 1.5


def _chosen(finalists: pd.DataFrame, column: str) -> float:
    """``column`` of the chosen finalist (NaN when none was chosen)."""
    if finalists.empty or "chosen" not in finalists:
        return float("nan")
    rows = finalists[finalists["chosen"].astype(bool)]
    return float("nan") if rows.empty else float(rows[column].iloc[0])


def budget_use(finalists: pd.DataFrame, budget: Budget) -> float:
    """The share of ``budget`` the chosen finalist measured at: its paired ratio over the
    fraction less headroom (``Budget.target_ratio``), or its measured ms over the budget in ms
    (checked as given). NaN when nothing was chosen by measurement."""
    if budget.fraction is not None:
        return _chosen(finalists, "measured_ratio") / budget.target_ratio()
    return _chosen(finalists, "measured_latency_ms") / float(budget.ms)  # type: ignore[arg-type]


def second_round_budget_ms(search_budget_ms: float, use: float,
                           min_use: float = MIN_BUDGET_USE,
                           max_scale: float = MAX_BUDGET_SCALE) -> float | None:
    """The search budget of a second search when the first's chosen plan used less than
    ``min_use`` of the budget when measured: ``search_budget_ms / use`` (at most ``max_scale``
    times the first), so the latency model's error on the search's own plans is divided out.
    None when the first used enough (or nothing was measured)."""
    if not math.isfinite(use) or use <= 0 or use >= min_use:
        return None
    return float(search_budget_ms) * min(1.0 / use, max_scale)


def keep_second(first: pd.DataFrame, second: pd.DataFrame) -> bool:
    """Whether the second search's choice replaces the first's: it met the budget by
    measurement and its proxy is at least the first's (the same evaluator scored both)."""
    p2 = _chosen(second, "proxy")
    if not math.isfinite(p2):
        return False
    p1 = _chosen(first, "proxy")
    return not math.isfinite(p1) or p2 >= p1
