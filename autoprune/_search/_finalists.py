"""``select_finalists``: the one way a plan is chosen from a study's trials by measuring on the
device. Both ``search()`` and ``run_pipeline`` call it.

Candidates are the completed trials predicted within the search budget (``feasible``) that
have a proxy, one per distinct plan (``plan_json``), in :func:`candidate_order`:

1. the trials whose proxy is within ``proxy_tolerance`` of the best proxy, largest predicted
   latency first (a proxy difference that small is noise, and the larger plan keeps more of the
   network for fine-tuning; with ``proxy_tolerance=0`` this is the best-proxy trial);
2. the Pareto front's knee, if not listed already (a balanced plan, likely to fit when the
   best ones measure slower than predicted);
3. the rest by proxy, faster first on ties.

Trials re-scored by a costlier proxy (``refine_proxies``: column ``proxy_refined``) come before
all of these, ordered by that proxy the same way (role ``refined``); the chosen plan is then a
refined one whenever a refined finalist meets the budget.

The first ``n_finalists`` candidates are applied and timed against the dense model (paired,
alternating runs: ``Backend.measure_ratio``). While none has met the budget, further candidates
are measured, up to ``max_remeasure`` in all. After a miss the rest are re-ordered by what the
miss showed (``recalibrated_order``): the candidates whose predicted latency, scaled by the
worst measured / predicted so far, fits the budget come first, best proxy first — so the next
one measured is the best plan expected to fit, not the knee, which can sit far below the
budget (the quickstart's knee used 63% of it). A candidate meets the budget when its measurement
is within the budget less its headroom (``Budget.met_by`` on the measurement scaled by
``1 / (1 - headroom)``): a fraction is checked on the paired ratio, milliseconds on ``ratio x
dense`` (the dense latency measured as the median of three runs unless ``dense_ms`` is given).
The chosen plan is, among the finalists that met the budget, the one with the highest proxy,
the largest predicted latency first among those within ``proxy_tolerance`` of it. Without
``verify`` nothing is measured and the first candidate is chosen by prediction.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from autoprune._search._refine import REFINED_COLUMN
from autoprune._search._result import PLAN_COLUMN, candidate_rows, knee_index, pareto_front
from autoprune.budget import Budget
from autoprune.errors import InvalidInputError
from autoprune.plan import PruningPlan

if TYPE_CHECKING:
    from torch import nn

    from autoprune.types import ModelSpec

#: columns of ``Finalists.table`` (and ``SearchResult.finalists``)
FINALIST_COLUMNS = ["trial", "role", "proxy", "predicted_latency_ms", "measured_latency_ms",
                    "measured_ratio", "ratio_iqr", "meets_budget", "chosen", "plan"]


@dataclass(frozen=True)
class Finalists:
    """What :func:`select_finalists` measured. ``table``: one row per measured candidate
    (``FINALIST_COLUMNS``; ``plan`` is the plan JSON); ``chosen``: the chosen plan or None;
    ``dense_ms``: the dense latency the measured ratios were scaled by (NaN if none);
    ``notes``: what went wrong (candidates that missed, noisy dense timings)."""

    table: pd.DataFrame
    chosen: PruningPlan | None
    dense_ms: float = float("nan")
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def chosen_trial(self) -> int | None:
        if self.table.empty:
            return None
        rows = self.table[self.table["chosen"].astype(bool)]
        return None if len(rows) == 0 else int(rows["trial"].iloc[0])


def _check_tolerance(proxy_tolerance: Any) -> float:
    if isinstance(proxy_tolerance, bool) or not isinstance(proxy_tolerance, (int, float)) \
            or not math.isfinite(proxy_tolerance) or proxy_tolerance < 0:
        raise InvalidInputError(f"proxy_tolerance must be a finite number >= 0, got "
                                f"{proxy_tolerance!r}")
    return float(proxy_tolerance)


def candidate_order(trials: pd.DataFrame, proxy_tolerance: float = 0.0) -> pd.DataFrame:
    """The candidate trials (rows of ``trials``) in the order they are re-measured, with a
    ``role`` column (``best``: within ``proxy_tolerance`` of the best proxy, ``knee``,
    ``next``); see the module docstring for the rule. One row per distinct plan."""
    tol = _check_tolerance(proxy_tolerance)
    cands = trials[candidate_rows(trials)]
    if cands.empty:
        return cands.assign(role=pd.Series(dtype=str))
    if REFINED_COLUMN in cands and cands[REFINED_COLUMN].notna().any():
        # refined trials first, by the costlier proxy (ties: the larger plan first); then the
        # others by the rule below
        ref = cands[cands[REFINED_COLUMN].notna()]
        best = ref[REFINED_COLUMN] >= ref[REFINED_COLUMN].max() - tol
        parts = [ref[best].sort_values(["predicted_latency_ms", REFINED_COLUMN],
                                       ascending=[False, False], kind="stable"),
                 ref[~best].sort_values([REFINED_COLUMN, "predicted_latency_ms"],
                                        ascending=[False, True], kind="stable")]
        rest = candidate_order(cands[cands[REFINED_COLUMN].isna()].drop(columns=REFINED_COLUMN),
                               tol)
        order = pd.concat([pd.concat(parts).assign(role="refined"), rest])
        if PLAN_COLUMN in order:
            order = order.drop_duplicates(subset=[PLAN_COLUMN], keep="first")
        return order
    top = cands["proxy"] >= cands["proxy"].max() - tol
    head = cands[top].sort_values(["predicted_latency_ms", "proxy"], ascending=[False, False],
                                  kind="stable").assign(role="best")
    rest = cands[~top].sort_values(["proxy", "predicted_latency_ms"], ascending=[False, True],
                                   kind="stable").assign(role="next")
    parts = [head]
    front = pareto_front(cands if "state" in cands else cands.assign(state="COMPLETE"))
    k = knee_index(front)
    if k is not None:
        n = front["trial"].iloc[k]
        if n not in set(head["trial"]):
            parts.append(rest[rest["trial"] == n].assign(role="knee"))
            rest = rest[rest["trial"] != n]
    parts.append(rest)
    order = pd.concat(parts)
    if PLAN_COLUMN in order:
        order = order.drop_duplicates(subset=[PLAN_COLUMN], keep="first")
    return order


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def select_finalists(
    trials: pd.DataFrame,
    model: nn.Module,
    example_inputs: Any,
    spec: ModelSpec,
    backend: Any,
    budget: Budget,
    *,
    n_finalists: int = 3,
    max_remeasure: int = 8,
    proxy_tolerance: float = 0.0,
    dense_ms: float | None = None,
    verify: bool = True,
) -> Finalists:
    """Re-measure the best candidates of ``trials`` (a ``SearchResult.trials`` frame: plans
    come from its ``plan_json`` column, no study is opened) against the dense ``model`` on
    ``backend`` and choose one that meets ``budget`` when measured; see the module docstring
    for the order and the rule. ``dense_ms``: the dense latency measured ratios are scaled by
    (``measured_latency_ms``; for a budget in milliseconds also what the budget is checked
    on); None: measured here for a budget in milliseconds, not needed for a fraction
    (``measured_latency_ms`` is then NaN)."""
    if not isinstance(budget, Budget):
        raise InvalidInputError(f"budget must be an autoprune.budget.Budget (Budget.of(...)), "
                                f"got {type(budget).__name__}")
    _check_count("n_finalists", n_finalists, 1)
    _check_count("max_remeasure", max_remeasure, 1)
    if PLAN_COLUMN not in trials:
        raise InvalidInputError(f"trials have no {PLAN_COLUMN!r} column: pass a "
                                "SearchResult.trials frame (autoprune.search or optimize)")
    order = candidate_order(trials, proxy_tolerance)
    notes: list[str] = []
    if order.empty:
        msg = ("no trial is predicted within the budget: run more trials, or raise the budget "
               "(the fastest plan's predicted latency is the lower bound)")
        warnings.warn(msg, stacklevel=2)
        return Finalists(pd.DataFrame(columns=FINALIST_COLUMNS), None, float("nan"), (msg,))
    refined = order[REFINED_COLUMN] if REFINED_COLUMN in order else \
        pd.Series(np.nan, index=order.index)
    # a refined trial is ranked (and reported) by its refined proxy
    ranked = refined.where(refined.notna(), order["proxy"])
    cands = [(int(r.trial), str(r.role), float(p), float(r.predicted_latency_ms),
              PruningPlan.from_json(getattr(r, PLAN_COLUMN)))
             for r, p in zip(order.itertuples(index=False), ranked)]
    if not verify:
        n, role, proxy, pred, plan = cands[0]
        row = _row(n, role, proxy, pred, plan, float("nan"), float("nan"), float("nan"), True)
        row["chosen"] = True
        return Finalists(pd.DataFrame([row], columns=FINALIST_COLUMNS), plan, float("nan"),
                         ("finalists were not re-measured (verify_finalists=False)",))
    from autoprune.executor import apply_plan

    dense_model = copy.deepcopy(model).eval()
    scale = float("nan") if dense_ms is None else float(dense_ms)
    if dense_ms is None and not budget.is_fraction:
        # the dense reference: median of three separate measurements (one burst of load on a
        # shared machine must not move every finalist's absolute latency)
        runs = [float(backend.measure_model(dense_model, example_inputs).median_ms)
                for _ in range(3)]
        scale = float(np.median(runs))
        if max(runs) > 1.25 * min(runs):
            notes.append(f"dense latency varied between measurements ({min(runs):.4g} to "
                         f"{max(runs):.4g} ms): the device is noisy; finalists use the median "
                         f"{scale:.4g} ms x their paired ratio")
    limit = max(n_finalists, min(max_remeasure, len(cands)))
    rows: list[dict[str, Any]] = []
    plans: dict[int, PruningPlan] = {}
    met = 0
    # the paired ratio at or below which a measurement meets the budget (less its headroom)
    ratio_ok = budget.target_ratio() if budget.is_fraction else budget.target_ms() / scale
    worst = 0.0  # the largest measured ratio per predicted ms among the misses so far
    pending = list(cands)
    i = -1
    while pending:
        i += 1
        if i >= n_finalists and (met > 0 or i >= limit):
            break
        n, role, proxy, pred, plan = pending.pop(0)
        pruned = apply_plan(model, plan, example_inputs, spec=spec).eval()
        ratio, iqr = backend.measure_ratio(pruned, dense_model, example_inputs)
        ratio = float(ratio)
        # within the budget less its headroom <=> the measurement / (1 - headroom) meets it
        ok = budget.met_by(ratio=ratio / (1.0 - budget.headroom),
                           dense_ms=None if budget.is_fraction else scale)
        met += int(ok)
        measured = ratio * scale
        if not ok:
            what = (f"ratio {ratio:.3f} vs dense misses the {budget.target_ratio():.3f} target"
                    if budget.is_fraction else
                    f"{measured:.4g} ms (ratio {ratio:.3f} x dense {scale:.4g} ms) misses the "
                    f"{budget.target_ms():.4g} ms target")
            msg = (f"trial {n} ({role}): measured {what} ({budget}; predicted {pred:.4g} ms); "
                   "trying the next candidate")
            warnings.warn(msg, stacklevel=2)
            notes.append(msg)
            if pred > 0 and np.isfinite(ratio_ok):
                worst = max(worst, ratio / pred)
                pending = recalibrated_order(pending, ratio_ok / worst)
        plans[n] = plan
        rows.append(_row(n, role, proxy, pred, plan, measured, ratio, float(iqr), ok))
    table = pd.DataFrame(rows, columns=FINALIST_COLUMNS)
    passing = table[table["meets_budget"]]
    chosen: PruningPlan | None = None
    if passing.empty:
        msg = (f"none of the {len(table)} re-measured candidates met the budget ({budget}) on "
               "the device: no plan chosen; lower the budget passed to the search by the "
               "predictor's error, or re-profile")
        warnings.warn(msg, stacklevel=2)
        notes.append(msg)
    else:
        tol = _check_tolerance(proxy_tolerance)
        # refined finalists carry the costlier proxy (another scale): they are preferred
        refined_rows = passing[passing["role"] == "refined"]
        if not refined_rows.empty:
            passing = refined_rows
        near = passing[passing["proxy"] >= passing["proxy"].max() - tol]
        best_n = int(near.sort_values("predicted_latency_ms", ascending=False,
                                      kind="stable")["trial"].iloc[0])
        chosen = plans[best_n]
        table.loc[table["trial"] == best_n, "chosen"] = True
    return Finalists(table, chosen, scale, tuple(notes))


def recalibrated_order(pending: list[Any], limit_pred_ms: float) -> list[Any]:
    """The candidates still to measure after a miss: first those predicted within
    ``limit_pred_ms`` (the budget scaled by the worst measured / predicted so far), refined
    ones first, each by proxy (larger predicted first on ties), then the rest as they were.
    After a miss the next candidate is thus the best one expected to fit, not the knee of the
    front, which can sit far below the budget."""
    fits = [c for c in pending if c[3] <= limit_pred_ms]
    rest = [c for c in pending if c[3] > limit_pred_ms]
    fits.sort(key=lambda c: (c[1] != "refined", -c[2], -c[3]))
    return fits + rest


def _row(n: int, role: str, proxy: float, pred: float, plan: PruningPlan, measured: float,
         ratio: float, iqr: float, ok: bool) -> dict[str, Any]:
    return {"trial": n, "role": role, "proxy": proxy, "predicted_latency_ms": pred,
            "measured_latency_ms": measured, "measured_ratio": ratio, "ratio_iqr": iqr,
            "meets_budget": bool(ok), "chosen": False, "plan": plan.to_json(indent=None)}
