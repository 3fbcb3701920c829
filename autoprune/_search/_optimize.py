"""``optimize``: the pure search stage. Given a ``SearchProblem`` (space, latency model,
proxy, budget, storage) and a strategy it runs (or resumes) the study and returns its trials as
a DataFrame, each with its plan's JSON; it profiles, fits and measures nothing.

Also here: ``trials_frame`` (a study -> the trials table), the latency and proxy adapters the
facade builds a problem from (``latency_fn``, ``CachedProxy``) and the progress bar.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from autoprune._search._result import INTERVAL_COLUMNS, PLAN_COLUMN, TRIAL_COLUMNS
from autoprune.errors import AutoPruneError, InvalidInputError
from autoprune.latency._model import as_latency_model
from autoprune.plan import PruningPlan
from autoprune.strategies.base import SearchProblem, plan_key
from autoprune.types import ModelSpec, Structure

if TYPE_CHECKING:
    import optuna
    from torch import nn

    from autoprune.latency._model import LatencyModel
    from autoprune.strategies.base import Strategy

log = logging.getLogger(__name__)


def optimize(problem: SearchProblem, strategy: Strategy | str, n_trials: int, *,
             latency_model: LatencyModel | Any | None = None, timeout_s: float | None = None,
             progress: bool = False, assume_single_worker: bool = True) -> pd.DataFrame:
    """Run ``strategy`` on ``problem`` until its study holds ``n_trials`` counted trials
    (a stored study resumes: only the missing trials run) and return every trial
    (:func:`trials_frame`: ``TRIAL_COLUMNS``, ``keep:``/``structure:`` per group,
    ``plan_json``, and the latency model's band ``latency_low_ms``/``latency_high_ms`` when
    ``latency_model`` is given, NaN otherwise). ``feasible`` is "predicted within
    ``problem.budget_ms``". Trials a dead worker left running are failed first
    (``assume_single_worker``: no other worker shares the storage)."""
    from autoprune.storage import fail_stale_trials
    from autoprune.strategies import get_strategy

    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise InvalidInputError(f"n_trials must be an integer >= 1, got {n_trials!r}")
    if not isinstance(problem, SearchProblem):
        raise InvalidInputError(f"problem must be an autoprune.strategies.base.SearchProblem, "
                                f"got {type(problem).__name__}")
    strat = get_strategy(strategy) if isinstance(strategy, str) else strategy
    study0 = peek_study(problem.storage, problem.study_name)
    initial = 0
    if study0 is not None:
        fail_stale_trials(study0, assume_single_worker=assume_single_worker)
        initial = problem.n_done(study0)
    bar = _Progress(n_trials, min(initial, n_trials), problem.budget_ms, progress)
    problem.callbacks.append(bar)
    t0 = time.perf_counter()
    try:
        study = strat.run(problem, n_trials, timeout_s=timeout_s)
    finally:
        bar.close()
        problem.callbacks.remove(bar)
    log.info("search: %d trials in %.1f s", len(study.trials), time.perf_counter() - t0)
    dense_pred = float(problem.latency_ms([problem.space.dense_plan()])[0])
    trials = trials_frame(study, problem.space.spec, problem.budget_ms, dense_pred)
    add_intervals(trials, None if latency_model is None else as_latency_model(latency_model))
    return trials


def peek_study(storage: Any, study_name: str) -> optuna.Study | None:
    """The stored study of that name, or None."""
    import optuna

    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return None


# --- trials table ------------------------------------------------------------------------
def _group_values(spec: ModelSpec, plan: PruningPlan) -> dict[str, Any]:
    kept = spec.kept_units(plan)
    out: dict[str, Any] = {}
    for g in spec.groups.values():
        gp = plan.groups.get(g.name)
        s = gp.structure if gp is not None else Structure.NONE
        if s == Structure.BLOCK:
            k = 0.0
        elif s == Structure.CHANNEL:
            k = kept.get(g.name, g.units) / g.units
        elif gp is not None and s in (Structure.NM, Structure.UNSTRUCTURED):
            k = float(gp.density)
        else:
            k = 1.0
        out[f"keep:{g.name}"] = k
        out[f"structure:{g.name}"] = s.value
    return out


def trials_frame(study: optuna.Study, spec: ModelSpec, budget_ms: float,
                 dense_predicted_ms: float) -> pd.DataFrame:
    """One row per trial of ``study`` with the documented columns."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        lat = float(a.get("predicted_latency_ms", float("nan")))
        proxy = float(t.values[0]) if t.values else float("nan")
        row: dict[str, Any] = {
            "trial": t.number,
            "proxy": proxy,
            "predicted_latency_ms": lat,
            "measured_latency_ms": float("nan"),
            "macs": int(a.get("macs", 0)),
            "params": int(a.get("params", 0)),
            "speedup": dense_predicted_ms / lat if lat and math.isfinite(lat) else float("nan"),
            "feasible": bool(t.state.name == "COMPLETE" and lat <= budget_ms),
            "state": t.state.name,
            "error": str(a.get("error", "")),
        }
        plan_d = a.get("plan")
        if plan_d is not None:
            plan = PruningPlan.from_dict(plan_d)
            row.update(_group_values(spec, plan))
            row[PLAN_COLUMN] = plan.to_json(indent=None)
        else:
            row[PLAN_COLUMN] = ""
        rows.append(row)
    cols = list(TRIAL_COLUMNS)
    for g in spec.groups:
        cols += [f"keep:{g}", f"structure:{g}"]
    cols.append(PLAN_COLUMN)
    df = pd.DataFrame(rows, columns=cols)
    if not df.empty:
        df["feasible"] = df["feasible"].astype(bool)
    return df


def add_intervals(trials: pd.DataFrame, model: Any | None) -> None:
    """``latency_low_ms`` / ``latency_high_ms``: the latency model's band for each trial's
    plan (NaN where a trial has no plan, the model cannot price it, or there is no model)."""
    low = np.full(len(trials), np.nan)
    high = np.full(len(trials), np.nan)
    texts = list(trials[PLAN_COLUMN]) if PLAN_COLUMN in trials else []
    idx = [i for i, s in enumerate(texts) if isinstance(s, str) and s]
    if idx and model is not None:
        plans = [PruningPlan.from_json(texts[i]) for i in idx]
        try:
            lo, hi = model.predict_interval(plans)
            low[idx], high[idx] = lo, hi
        except AutoPruneError:
            pass  # plans the model cannot price keep NaN (their trials failed already)
    trials[INTERVAL_COLUMNS[0]] = low
    trials[INTERVAL_COLUMNS[1]] = high


# --- latency / proxy adapters ------------------------------------------------------------
class LatencyUnavailable(AutoPruneError):
    """The latency model could not price a plan (e.g. a table miss it cannot interpolate)."""


def latency_fn(predictor: Any) -> Callable[[Sequence[PruningPlan]], np.ndarray]:
    """Vectorised plan -> ms. A plan the model cannot price gets ``inf`` (never feasible, never
    chosen by greedy/RL); for a single plan the reason is raised as ``LatencyUnavailable`` so
    the trial fails with it."""
    lm = as_latency_model(predictor)
    many: Callable[[list[PruningPlan]], Any] = lm.predict_many
    one: Callable[[PruningPlan], float] = lm.predict

    def latency(plans: Sequence[PruningPlan]) -> np.ndarray:
        plans = list(plans)
        try:
            return np.asarray(many(plans), dtype=float)
        except AutoPruneError as e:
            if len(plans) == 1:
                raise LatencyUnavailable(f"{type(e).__name__}: {e}") from e
        out = np.empty(len(plans))
        for i, p in enumerate(plans):
            try:
                out[i] = one(p)
            except AutoPruneError:
                out[i] = math.inf
        return out

    return latency


class CachedProxy:
    """Proxy per plan, cached by plan JSON; applies the plan for model evaluators."""

    def __init__(self, evaluator: Any, model: nn.Module | None, example_inputs: Any,
                 spec: ModelSpec) -> None:
        self.evaluator = evaluator
        self.model = model
        self.example_inputs = example_inputs
        self.spec = spec
        self.cache: dict[str, float] = {}

    def __call__(self, plan: PruningPlan) -> float:
        k = plan_key(plan)
        if k in self.cache:
            return self.cache[k]
        if hasattr(self.evaluator, "evaluate_plan"):
            v = float(self.evaluator.evaluate_plan(plan))
        else:
            from autoprune.executor import apply_plan

            if self.model is None:
                raise InvalidInputError(
                    f"the evaluator {type(self.evaluator).__name__} scores models, so "
                    "CachedProxy needs the model to apply each plan to (got model=None); pass "
                    "the model, or give a plan evaluator (with evaluate_plan(plan))"
                )
            pruned = apply_plan(self.model, plan, self.example_inputs, spec=self.spec)
            v = float(self.evaluator(pruned))
        if not math.isnan(v):
            self.cache[k] = v
        return v

    def dense(self) -> float:
        try:
            if hasattr(self.evaluator, "evaluate_plan"):
                return float(self.evaluator.evaluate_plan(PruningPlan.dense(self.spec)))
            return float(self.evaluator(copy.deepcopy(self.model)))
        except Exception as e:  # noqa: BLE001 - a reference point only
            log.warning("could not evaluate the dense model: %s", e)
            return float("nan")


# --- progress --------------------------------------------------------------------------------
class _Progress:
    def __init__(self, total: int, initial: int, budget_ms: float, enabled: bool) -> None:
        self.budget_ms = budget_ms
        self.best = -math.inf
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="search", unit="trial",
                            dynamic_ncols=True)

    def __call__(self, study: Any, trial: Any) -> None:
        if trial is not None and trial.values and trial.user_attrs.get(
                "predicted_latency_ms", math.inf) <= self.budget_ms:
            self.best = max(self.best, float(trial.values[0]))
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(
                f"best feasible proxy {self.best:.4g}" if math.isfinite(self.best)
                else "no feasible trial yet")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

