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
    """The widest uniform plan measured within a budget fraction, and its predicted latency."""

    budget_ms: float
    keep_ratio: float
    measured_ratio: float
    ratio_iqr: float
    plan: PruningPlan


def anchor_budget_ms(model: nn.Module, args: tuple[Any, ...], spec: ModelSpec, table: Any,
                     backend: Any, predictor: Any, fraction: float,
                     space_options: dict[str, Any] | None = None, iters: int = 5,
                     ) -> BudgetAnchor | None:
    """Translate a budget given as a share of dense latency into predicted milliseconds by
    measurement: bisect the keep ratio of a uniform plan on the space's width grid until its
    paired ratio vs dense is at most ``fraction``; the widest such plan's predicted latency is
    the search budget. The search then looks for plans predicted no slower than a plan known
    to fit, whatever the predictor's bias at that size; the uniform plan itself is in the
    search (a warm start), so the search has to beat it on the proxy. None if even the
    narrowest uniform plan measured does not fit."""
    from autoprune.executor import apply_plan
    from autoprune.space import SearchSpace

    space = SearchSpace.from_spec(spec, table, backend, **(space_options or {}))
    dense = copy.deepcopy(model).eval()
    best: BudgetAnchor | None = None
    lo, hi = 0.0, 1.0
    for _ in range(max(1, iters)):
        r = 0.5 * (lo + hi)
        plan = space.uniform_plan(max(r, 1e-3))
        pruned = apply_plan(model, plan, args, spec=spec).eval()
        ratio, iqr = backend.measure_ratio(pruned, dense, args)
        if float(ratio) <= fraction:
            if best is None or r > best.keep_ratio:
                best = BudgetAnchor(float(predictor.predict(plan)), r, float(ratio), float(iqr),
                                    plan)
            lo = r
        else:
            hi = r
    return best

