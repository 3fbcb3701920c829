"""``anchor_budget_ms``: a budget given as a share of dense latency becomes predicted
milliseconds by measurement (the widest uniform plan whose paired ratio fits)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autoprune.plan import PruningPlan

if TYPE_CHECKING:
    from torch import nn

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
