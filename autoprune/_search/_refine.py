"""``refine_proxies``: a second, costlier proxy for the search's best candidates (two fidelities).

At aggressive budgets the cheap proxy (accuracy after BatchNorm re-calibration) sits near chance
for every plan and ranks them poorly; a few fine-tuning steps per candidate rank them far better
but cost too much for every trial. So the study runs on the cheap proxy, and the ``top_k``
distinct feasible plans it ranks best are re-scored with ``evaluator`` (typically
``accuracy_evaluator(val, calib_loader=train, finetune_steps=50)``). The score goes into the
trials' ``proxy_refined`` column (NaN for trials not refined); ``candidate_order`` puts refined
trials first, ordered by it, and ``select_finalists`` chooses among the refined finalists that
meet the budget when any does.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from autoprune._search._result import PLAN_COLUMN, candidate_rows
from autoprune.errors import InvalidInputError
from autoprune.plan import PruningPlan

if TYPE_CHECKING:
    from torch import nn

    from autoprune.types import ModelSpec

#: the trials column the refined score goes into
REFINED_COLUMN = "proxy_refined"


def refine_proxies(trials: pd.DataFrame, model: nn.Module, example_inputs: Any,
                   spec: ModelSpec, evaluator: Any, top_k: int = 8,
                   progress: bool = False) -> pd.DataFrame:
    """A copy of ``trials`` with ``proxy_refined``: ``evaluator(pruned model)`` for the
    ``top_k`` distinct feasible completed plans with the best cheap proxy (larger predicted
    latency first on ties), NaN elsewhere. ``evaluator``: a ``model -> float`` (higher is
    better; it may modify the model it gets: each candidate is a fresh copy)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise InvalidInputError(f"refine_top_k must be an integer >= 1, got {top_k!r}")
    if not callable(evaluator):
        raise InvalidInputError(f"refine_evaluator must be a callable model -> float, got "
                                f"{type(evaluator).__name__}")
    if PLAN_COLUMN not in trials:
        raise InvalidInputError(f"trials have no {PLAN_COLUMN!r} column: pass a "
                                "SearchResult.trials frame")
    out = trials.copy()
    out[REFINED_COLUMN] = np.nan
    ok = candidate_rows(out)
    cands = out[ok].sort_values(["proxy", "predicted_latency_ms"], ascending=[False, False],
                                kind="stable").drop_duplicates(subset=[PLAN_COLUMN])
    picked = cands.head(top_k)
    from tqdm.auto import tqdm

    from autoprune.executor import apply_plan

    scores: dict[str, float] = {}
    for plan_json in tqdm(list(picked[PLAN_COLUMN]), desc="refining proxies", unit="plan",
                          disable=not progress):
        pruned = apply_plan(copy.deepcopy(model), PruningPlan.from_json(plan_json),
                            example_inputs, spec=spec)
        score = float(evaluator(pruned))
        if not math.isfinite(score):
            raise InvalidInputError(f"refine_evaluator returned {score!r}; it must return a "
                                    "finite number (higher is better)")
        scores[plan_json] = score
    hit = out[PLAN_COLUMN].isin(scores.keys()) & ok
    out.loc[hit, REFINED_COLUMN] = out.loc[hit, PLAN_COLUMN].map(scores)
    return out


__all__ = ["REFINED_COLUMN", "refine_proxies"]
