"""``SearchResult``: every trial (with its plan as JSON), the Pareto front, the finalists that
were re-measured on the device, and the best plan; ``pareto_front`` and ``knee_index``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from autoprune.errors import CorruptFileError, InvalidInputError
from autoprune.io import atomic_write_json, atomic_write_text, read_json
from autoprune.plan import PruningPlan

if TYPE_CHECKING:
    from autoprune._search._finalists import Finalists

RESULT_SCHEMA_VERSION = 1
#: fixed columns of ``SearchResult.trials`` (then ``keep:<group>``, ``structure:<group>``,
#: ``plan_json``, and the ``INTERVAL_COLUMNS``)
TRIAL_COLUMNS = ("trial", "proxy", "predicted_latency_ms", "measured_latency_ms", "macs",
                 "params", "speedup", "feasible", "state", "error")
#: each trial's plan as compact JSON (``PruningPlan.to_json(indent=None)``; empty for a trial
#: that failed before its plan was sampled): nothing downstream reopens the study for a plan
PLAN_COLUMN = "plan_json"
#: the latency model's uncertainty band of each trial, added after the study ran
INTERVAL_COLUMNS = ("latency_low_ms", "latency_high_ms")


# --- result ------------------------------------------------------------------------------
@dataclass
class SearchResult:
    """What a search found. ``trials``: one row per trial (``TRIAL_COLUMNS`` then per group
    ``keep:<group>`` (kept share: width for channel, density for nm/unstructured, 0 for a
    removed block) and ``structure:<group>``). ``speedup`` is predicted dense / predicted plan.
    ``finalists``: the candidates re-measured on the device. ``dense_latency_ms``: the dense
    model measured on the device (its predicted value is ``dense_predicted_ms``)."""

    trials: pd.DataFrame
    best_plan: PruningPlan | None
    dense_latency_ms: float
    budget_ms: float
    finalists: pd.DataFrame = field(default_factory=pd.DataFrame)
    dense_predicted_ms: float = float("nan")
    dense_proxy: float = float("nan")
    strategy: str = ""
    study_name: str = ""
    run_dir: Path | None = None
    device: str = ""
    notes: list[str] = field(default_factory=list)
    space: dict[str, Any] = field(default_factory=dict)
    #: the budget the user asked for, when the search ran against another (internal) one:
    #: ``run_pipeline`` searches at an anchored predicted budget for a budget fraction
    user_budget_ms: float = float("nan")

    # --- views ---------------------------------------------------------------------------
    def pareto_front(self) -> pd.DataFrame:
        """Non-dominated feasible trials (maximise proxy, minimise predicted latency), sorted
        by predicted latency; same columns as ``trials``."""
        return pareto_front(self.trials)

    @property
    def best_trial(self) -> pd.Series | None:
        if self.best_plan is None or self.finalists.empty:
            return None
        ok = self.finalists[self.finalists["chosen"]]
        if ok.empty:
            return None
        n = int(ok["trial"].iloc[0])
        return self.trials.set_index("trial").loc[n]

    def knee(self) -> pd.Series | None:
        """The front's knee: the point farthest from the line joining its ends (normalised)."""
        front = self.pareto_front()
        i = knee_index(front)
        return None if i is None else front.iloc[i]

    # --- output --------------------------------------------------------------------------
    def plot(self, path: str | Path | None = None) -> Path:
        """Write a PNG of proxy vs latency (all trials, the front with the latency model's
        band, the budgets, the dense model, the measured finalists); returns the path. Drawn by
        :func:`autoprune.visualization.plot_search_front` (matplotlib is loaded only there)."""
        from autoprune.visualization import plot_search_front

        return plot_search_front(self, path)

    def plan(self, trial: int) -> PruningPlan:
        """The plan of trial number ``trial``, from its ``plan_json`` (no study is opened)."""
        rows = self.trials[self.trials["trial"] == trial]
        if rows.empty:
            raise InvalidInputError(f"no trial {trial!r} in this result (trials "
                                    f"{self.trials['trial'].min()}-{self.trials['trial'].max()})")
        text = rows[PLAN_COLUMN].iloc[0] if PLAN_COLUMN in rows else None
        if not isinstance(text, str) or not text:
            raise InvalidInputError(f"trial {trial} has no plan (state "
                                    f"{rows['state'].iloc[0]}): it failed before sampling one")
        return PruningPlan.from_json(text)

    def with_finalists(self, finalists: Finalists) -> SearchResult:
        """A copy with ``finalists`` (from :func:`select_finalists`) taken in: the finalists
        table, ``best_plan``, the dense latency used, the measured latency of each finalist in
        ``trials`` and the finalists' notes (replacing those of earlier finalists)."""
        trials = self.trials.copy()
        if "measured_latency_ms" in finalists.table and not finalists.table.empty:
            for n, ms in zip(finalists.table["trial"], finalists.table["measured_latency_ms"]):
                trials.loc[trials["trial"] == n, "measured_latency_ms"] = ms
        return replace(self, trials=trials, finalists=finalists.table,
                       best_plan=finalists.chosen,
                       dense_latency_ms=(finalists.dense_ms if math.isfinite(finalists.dense_ms)
                                         else self.dense_latency_ms),
                       notes=list(self.notes) + list(finalists.notes))

    def save(self, run_dir: str | Path | None = None) -> Path:
        """Write ``trials.csv``, ``pareto_front.csv``, ``finalists.csv``, ``best_plan.json``
        (if any) and ``search_result.json`` into ``run_dir``; returns the directory."""
        d = Path(run_dir) if run_dir is not None else self.run_dir
        if d is None:
            raise InvalidInputError("save() needs a run_dir")
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / "trials.csv", self.trials.to_csv(index=False))
        atomic_write_text(d / "pareto_front.csv", self.pareto_front().to_csv(index=False))
        atomic_write_text(d / "finalists.csv", self.finalists.to_csv(index=False))
        if self.best_plan is not None:
            self.best_plan.save(d / "best_plan.json")
        atomic_write_json(d / "search_result.json", {
            "schema_version": RESULT_SCHEMA_VERSION,
            "budget_ms": self.budget_ms,
            "user_budget_ms": _num(self.user_budget_ms),
            "dense_latency_ms": _num(self.dense_latency_ms),
            "dense_predicted_ms": _num(self.dense_predicted_ms),
            "dense_proxy": _num(self.dense_proxy),
            "strategy": self.strategy,
            "study_name": self.study_name,
            "device": self.device,
            "notes": list(self.notes),
            "best_plan": self.best_plan.to_dict() if self.best_plan is not None else None,
            "space": self.space,
        })
        return d

    @classmethod
    def load(cls, run_dir: str | Path) -> SearchResult:
        """Read back what ``save`` wrote."""
        d = Path(run_dir)
        meta = read_json(d / "search_result.json")
        if not isinstance(meta, dict) or "budget_ms" not in meta:
            raise CorruptFileError(f"{d / 'search_result.json'}: not a search result "
                                   "(no budget_ms)")
        trials = _read_csv(d / "trials.csv", converters={"error": str, PLAN_COLUMN: str})
        missing = [c for c in TRIAL_COLUMNS if c not in trials.columns]
        if missing:
            raise CorruptFileError(f"{d / 'trials.csv'}: missing columns {missing}")
        fpath = d / "finalists.csv"
        finalists = _read_csv(fpath) if fpath.exists() and fpath.stat().st_size > 1 \
            else pd.DataFrame()
        best = meta.get("best_plan")
        return cls(
            trials=trials, best_plan=PruningPlan.from_dict(best) if best else None,
            dense_latency_ms=float(meta.get("dense_latency_ms") or float("nan")),
            budget_ms=float(meta["budget_ms"]), finalists=finalists,
            dense_predicted_ms=float(meta.get("dense_predicted_ms") or float("nan")),
            dense_proxy=float(meta.get("dense_proxy") or float("nan")),
            strategy=meta.get("strategy", ""), study_name=meta.get("study_name", ""),
            run_dir=d, device=meta.get("device", ""), notes=list(meta.get("notes", [])),
            space=meta.get("space", {}),
            user_budget_ms=float(meta.get("user_budget_ms") or float("nan")),
        )

    def __repr__(self) -> str:
        n = len(self.trials)
        nf = int(self.trials["feasible"].sum()) if n else 0
        best = "none" if self.best_plan is None else str(self.best_plan)
        return (f"SearchResult({self.strategy}: {n} trials, {nf} feasible, budget "
                f"{self.budget_ms:.4g} ms, dense {self.dense_latency_ms:.4g} ms, best {best})")


def _read_csv(path: Path, **kwargs: Any) -> pd.DataFrame:
    try:
        return pd.read_csv(path, **kwargs)
    except FileNotFoundError:
        raise CorruptFileError(f"{path}: file not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError,
            ValueError) as e:
        raise CorruptFileError(f"{path}: cannot parse as CSV ({type(e).__name__}: "
                               f"{str(e).strip()[:200]})") from None


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def candidate_rows(trials: pd.DataFrame) -> pd.Series:
    """Boolean mask of the trials that can become a plan: predicted within the budget
    (``feasible``), scored (``proxy``), completed (``state``, where there is one) and carrying
    a plan (``plan_json``, where there is one)."""
    ok = trials["feasible"].astype(bool) & trials["proxy"].notna()
    if "state" in trials:
        ok &= trials["state"] == "COMPLETE"
    if PLAN_COLUMN in trials:
        ok &= trials[PLAN_COLUMN].map(lambda s: isinstance(s, str) and bool(s))
    return ok


def pareto_front(trials: pd.DataFrame) -> pd.DataFrame:
    """Non-dominated rows among completed feasible trials (max proxy, min predicted latency)."""
    if trials.empty:
        return trials.copy()
    ok = trials[(trials["state"] == "COMPLETE") & trials["feasible"].astype(bool)
                & trials["proxy"].notna()]
    ok = ok.sort_values(["predicted_latency_ms", "proxy"], ascending=[True, False])
    keep = []
    best = -math.inf
    for idx, row in ok.iterrows():
        if row["proxy"] > best:
            keep.append(idx)
            best = row["proxy"]
    return ok.loc[keep].reset_index(drop=True)


def knee_index(front: pd.DataFrame) -> int | None:
    """Index (in ``front``) of the point farthest from the chord between the front's ends."""
    if front.empty:
        return None
    if len(front) < 3:
        return int(np.argmax(front["proxy"].to_numpy()))
    x = front["predicted_latency_ms"].to_numpy(float)
    y = front["proxy"].to_numpy(float)
    xs = (x - x.min()) / max(x.max() - x.min(), 1e-12)
    ys = (y - y.min()) / max(y.max() - y.min(), 1e-12)
    # chord from (0, 0) (fastest, lowest proxy) to (1, 1); distance above it
    d = (ys - xs) / math.sqrt(2.0)
    return int(np.argmax(d))

