"""``search``: find the per-group pruning plan that keeps the most accuracy within a latency
budget on a device, and ``SearchResult``: every trial, the Pareto front, the finalists that were
re-measured on the device, and the best plan.

Flow of ``search``: analyse the model; profile it on the device (an existing table for the same
device and model is reused by the profiler) unless ``table=`` is given; fit the latency
predictor unless ``predictor=`` is given; build the search space; check the budget (zero,
negative or NaN -> ``InvalidInputError``; below the fastest plan of the space ->
``InfeasibleBudgetError`` stating the fastest predicted latency); run the strategy with the
study stored in ``run_dir`` (or ``storage=``) so a second call with the same arguments resumes;
then re-measure finalists on the device. Without ``run_dir`` and ``storage`` the study lives
in memory and nothing is written (the latency table, if profiled, goes to the user cache).

Finalists and the budget guarantee: candidates are the feasible trials (predicted within
budget) in this order: the best proxy, the front's knee, then the remaining ones by proxy.
The first ``n_finalists`` are applied and timed against the dense model (paired, alternating
runs: ``measured = ratio x dense``, with ``dense`` the median of three measurements). A candidate whose measured latency misses the budget is
reported (a warning and a note) and the next one is tried, up to ``max_remeasure`` candidates.
``best_plan`` is the best-proxy finalist that met the budget when measured; if none did,
``best_plan`` is ``None`` and ``result.notes`` says why (the trials are kept: a tighter
budget or more trials is the fix). With ``verify_finalists=False`` nothing is measured and
``best_plan`` is the best feasible trial by prediction.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from autoprune.budget import Budget
from autoprune.errors import (
    AutoPruneError,
    CorruptFileError,
    InfeasibleBudgetError,
    InvalidInputError,
)
from autoprune.latency._model import TableLatencyModel, as_latency_model
from autoprune.plan import PruningPlan
from autoprune.strategies.base import SearchProblem, plan_key
from autoprune.types import ModelSpec, Structure

if TYPE_CHECKING:
    import optuna
    from torch import nn

    from autoprune.space import SearchSpace

log = logging.getLogger(__name__)

RESULT_SCHEMA_VERSION = 1
#: fixed columns of ``SearchResult.trials`` (then ``keep:<group>``, ``structure:<group>``)
TRIAL_COLUMNS = ("trial", "proxy", "predicted_latency_ms", "measured_latency_ms", "macs",
                 "params", "speedup", "feasible", "state", "error")
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
        """Write a PNG of proxy vs latency on one axis: all trials (predicted), the front with
        the latency model's band, the search budget and the user's budget (when they differ),
        the dense model, and the finalists as measured on the device, each joined to its
        prediction. Returns the path."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if path is None:
            if self.run_dir is None:
                raise InvalidInputError("plot() needs a path (this result has no run_dir)")
            path = Path(self.run_dir) / "pareto.png"
        path = Path(path)
        t = self.trials
        done = t[t["state"] == "COMPLETE"]
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        feas, infeas = done[done["feasible"]], done[~done["feasible"]]
        ax.scatter(infeas["predicted_latency_ms"], infeas["proxy"], s=12, c="#bbbbbb",
                   label="over budget (predicted)")
        ax.scatter(feas["predicted_latency_ms"], feas["proxy"], s=14, c="#4c72b0",
                   label="within budget (predicted)")
        front = self.pareto_front()
        if not front.empty:
            ax.plot(front["predicted_latency_ms"], front["proxy"], "-o", c="#dd8452", ms=4,
                    label="Pareto front (predicted)")
            if "latency_low_ms" in front and front["latency_low_ms"].notna().any():
                err = np.vstack([front["predicted_latency_ms"] - front["latency_low_ms"],
                                 front["latency_high_ms"] - front["predicted_latency_ms"]])
                ax.errorbar(front["predicted_latency_ms"], front["proxy"],
                            xerr=np.clip(np.nan_to_num(err), 0, None), fmt="none",
                            ecolor="#dd8452", alpha=0.5, capsize=2,
                            label="latency model's band")
        ax.axvline(self.budget_ms, c="#c44e52", ls="--",
                   label=f"search budget {self.budget_ms:.3g} ms")
        if math.isfinite(self.user_budget_ms) and \
                abs(self.user_budget_ms - self.budget_ms) > 1e-9 * self.budget_ms:
            ax.axvline(self.user_budget_ms, c="#8c1c13", ls="-",
                       label=f"your budget {self.user_budget_ms:.3g} ms")
        dense_x = self.dense_predicted_ms if math.isfinite(self.dense_predicted_ms) \
            else self.dense_latency_ms
        if math.isfinite(dense_x):
            y = self.dense_proxy if math.isfinite(self.dense_proxy) else (
                done["proxy"].max() if len(done) else 1.0)
            ax.scatter([dense_x], [y], marker="*", s=160, c="k", zorder=5, label="dense model")
        if not self.finalists.empty and "measured_latency_ms" in self.finalists:
            f = self.finalists.dropna(subset=["measured_latency_ms"])
            if "predicted_latency_ms" in f:
                for _, row in f.iterrows():
                    ax.plot([row["predicted_latency_ms"], row["measured_latency_ms"]],
                            [row["proxy"], row["proxy"]], c="#55a868", lw=0.8, alpha=0.7)
            ax.scatter(f["measured_latency_ms"], f["proxy"], marker="x", s=50, c="#55a868",
                       zorder=6, label="finalists (measured; line to predicted)")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("accuracy proxy (higher is better)")
        ax.set_title(f"{self.strategy} search, budget {self.budget_ms:.3g} ms ({self.device})",
                     fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        import io

        from autoprune.io import atomic_write_bytes

        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        return atomic_write_bytes(path, buf.getvalue())

    def save(self, run_dir: str | Path | None = None) -> Path:
        """Write ``trials.csv``, ``pareto_front.csv``, ``finalists.csv``, ``best_plan.json``
        (if any) and ``search_result.json`` into ``run_dir``; returns the directory."""
        from autoprune.io import atomic_write_json, atomic_write_text

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
        from autoprune.io import read_json

        d = Path(run_dir)
        meta = read_json(d / "search_result.json")
        if not isinstance(meta, dict) or "budget_ms" not in meta:
            raise CorruptFileError(f"{d / 'search_result.json'}: not a search result "
                                   "(no budget_ms)")
        trials = _read_csv(d / "trials.csv", converters={"error": str})
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
        elif s in (Structure.NM, Structure.UNSTRUCTURED):
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
            row.update(_group_values(spec, PruningPlan.from_dict(plan_d)))
        rows.append(row)
    cols = list(TRIAL_COLUMNS)
    for g in spec.groups:
        cols += [f"keep:{g}", f"structure:{g}"]
    df = pd.DataFrame(rows, columns=cols)
    if not df.empty:
        df["feasible"] = df["feasible"].astype(bool)
    return df


def _add_intervals(trials: pd.DataFrame, study: optuna.Study, model: Any) -> None:
    """``latency_low_ms`` / ``latency_high_ms``: the latency model's band for each trial's
    plan (NaN where a trial has no plan or the model cannot price it)."""
    by_number = {t.number: t.user_attrs.get("plan") for t in study.get_trials(deepcopy=False)}
    low = np.full(len(trials), np.nan)
    high = np.full(len(trials), np.nan)
    idx = [i for i, n in enumerate(trials["trial"]) if by_number.get(int(n)) is not None]
    if idx:
        plans = [PruningPlan.from_dict(by_number[int(trials["trial"].iloc[i])]) for i in idx]
        try:
            lo, hi = model.predict_interval(plans)
            low[idx], high[idx] = lo, hi
        except AutoPruneError:
            pass  # plans the model cannot price keep NaN (their trials failed already)
    trials["latency_low_ms"] = low
    trials["latency_high_ms"] = high


# --- latency / proxy adapters ------------------------------------------------------------
class LatencyUnavailable(AutoPruneError):
    """The latency model could not price a plan (e.g. a table miss it cannot interpolate)."""


def _latency_fn(predictor: Any) -> Callable[[Sequence[PruningPlan]], np.ndarray]:
    """Vectorised plan -> ms. A plan the model cannot price gets ``inf`` (never feasible, never
    chosen by greedy/RL); for a single plan the reason is raised as ``LatencyUnavailable`` so
    the trial fails with it."""
    from autoprune.errors import AutoPruneError

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


class _CachedProxy:
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


# --- the call ------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:60]


def _check_budget(budget: Any) -> float:
    if budget is None:
        raise InvalidInputError("latency_budget_ms is required: the latency budget in "
                                "milliseconds on the target device, e.g. latency_budget_ms=8.0")
    return float(Budget.of(latency_budget_ms=budget).ms)  # type: ignore[arg-type]


def _storage(storage: Any, run_dir: Path | None) -> Any:
    """The Optuna storage: ``make_storage``'s, or in memory without ``storage`` and
    ``run_dir`` (nothing to resume, nothing written)."""
    if isinstance(storage, str) and storage.startswith("journal:"):
        storage = storage[len("journal:"):]
    if storage is None and run_dir is None:
        import optuna

        return optuna.storages.InMemoryStorage()
    from autoprune.storage import make_storage

    # a given storage does not use run_dir (only the default journal lives there)
    return make_storage(storage, run_dir if run_dir is not None else Path("."))


def _run_stem(spec: ModelSpec, device_name: str, budget_ms: float, strategy_name: str) -> str:
    """The default study name (and the CLI's default run directory under ``runs/``)."""
    return _slug(f"search_{spec.model_name}_{spec.fingerprint[:8]}_{device_name}_"
                 f"{budget_ms:.4g}ms_{strategy_name}")


def search(
    model: nn.Module,
    example_inputs: Any,
    device: str | Any = "onnxruntime-cpu",
    latency_budget_ms: float | None = None,
    evaluator: Callable[[nn.Module], float] | Any | None = None,
    n_trials: int = 200,
    strategy: str | Any = "tpe",
    table: Any | None = None,
    predictor: Any | str | None = None,
    space: SearchSpace | str | Path | None = None,
    storage: str | Path | Any | None = None,
    study_name: str | None = None,
    run_dir: str | Path | None = None,
    n_finalists: int = 3,
    seed: int = 0,
    progress: bool = True,
    timeout_s: float | None = None,
    *,
    spec: ModelSpec | None = None,
    verify_finalists: bool = True,
    max_remeasure: int = 8,
    strategy_options: dict[str, Any] | None = None,
    space_options: dict[str, Any] | None = None,
) -> SearchResult:
    """Search per-group pruning plans for ``model`` under ``latency_budget_ms`` on ``device``.

    ``evaluator``: any ``model -> float`` (higher is better; see ``autoprune.evaluators``), a
    plan evaluator (``evaluate_plan(plan)``), or None for the data-free weight-magnitude proxy.
    ``strategy``: ``tpe`` (default), ``nsga2``, ``motpe``, ``random``, ``rl``, ``greedy``, a
    ``Strategy`` or an Optuna sampler. ``space``: a ``SearchSpace``, a preset name or a YAML
    path (default: built from the model, table and backend; ``space_options`` go to it).
    ``predictor``: a fitted ``LatencyPredictor``, any callable plan -> ms, ``"table"`` (the
    table sums mapped onto two measured plans: ``TableLatencyModel``), or None (fit a
    ``LatencyPredictor``). ``n_trials`` is the study's total: a resumed study runs only the missing trials.
    ``run_dir`` holds the study journal (unless ``storage=`` is given) and the saved result
    (``SearchResult.save``); resuming needs it (or a persistent ``storage`` and the same
    ``study_name``, by default ``search-<model>-<fingerprint>-<device>-<budget>ms-<strategy>``).
    Without ``run_dir`` nothing is written: the study is kept in memory (unless ``storage=``),
    the result is returned unsaved (``result.run_dir`` is None; ``result.save(path)`` writes
    it), and a latency table profiled here goes to the user cache
    (``autoprune.io.cache_dir()``). See the module docstring for finalists.
    """
    budget = _check_budget(latency_budget_ms)
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise InvalidInputError(f"n_trials must be an integer >= 1, got {n_trials!r}")
    if isinstance(n_finalists, bool) or not isinstance(n_finalists, int) or n_finalists < 1:
        raise InvalidInputError(f"n_finalists must be an integer >= 1, got {n_finalists!r}")
    from autoprune.strategies import get_strategy

    strat = get_strategy(strategy, **(strategy_options or {}))

    # backend, spec, table, predictor ------------------------------------------------------
    backend = device
    if isinstance(device, str):
        from autoprune.backends import get_backend

        backend = get_backend(device)  # each backend has sane defaults (ORT: 1 thread)
    device_name = getattr(backend, "name", "") or type(backend).__name__
    _check_table_device(table, backend)
    if spec is None:
        from autoprune._analyze import analyze

        spec = analyze(model, example_inputs)
    if table is None and (predictor is None or isinstance(predictor, str) or space is None):
        from autoprune.latency._profile import profile

        table = profile(model, example_inputs, backend, spec=spec, progress=progress)
    # space ------------------------------------------------------------------------------------
    from autoprune.space import SearchSpace

    if space is None:
        space = SearchSpace.from_spec(spec, table, backend, **(space_options or {}))
    elif isinstance(space, (str, Path)):
        space = SearchSpace.from_yaml(space, spec, table, backend, **(space_options or {}))
    elif not isinstance(space, SearchSpace):
        raise InvalidInputError(f"space must be a SearchSpace, a preset name or a YAML path, got "
                                f"{type(space).__name__}")
    if space.spec.fingerprint != spec.fingerprint:
        raise InvalidInputError("space was built for another model (fingerprints differ); "
                                "build it from this model's spec")

    # latency model ------------------------------------------------------------------------------
    if predictor is None:
        from autoprune.latency._predictor import LatencyPredictor

        predictor = LatencyPredictor(random_state=seed).fit(
            table=table, model=model, example_inputs=example_inputs, backend=backend,
            spec=spec, progress=progress)
    elif isinstance(predictor, str):
        if predictor != "table":
            raise InvalidInputError(f"predictor must be a LatencyPredictor, a callable plan -> "
                                    f"ms, or 'table'; got {predictor!r}")
        if table is None:
            raise InvalidInputError("predictor='table' needs a latency table (table=...)")
        predictor = TableLatencyModel(table, spec).fit(
            model, example_inputs, backend, [space.dense_plan(), space.fastest_plan()])
    latency_ms = _latency_fn(predictor)

    # budget against what the space can reach -------------------------------------------------
    dense_pred = float(latency_ms([space.dense_plan()])[0])
    fastest = float(latency_ms([space.fastest_plan()])[0])
    if budget < fastest:
        raise InfeasibleBudgetError(
            budget, fastest,
            f"dense model predicted at {dense_pred:.4g} ms; raise the budget or widen the "
            f"space (lower min_keep_ratio, allow_block=True)")
    notes: list[str] = []
    if fastest <= 0 or dense_pred <= 0:
        msg = (f"the latency predictor gives {fastest:.4g} ms for the fastest plan and "
               f"{dense_pred:.4g} ms for the dense one: predictions <= 0 mean it extrapolates "
               "badly; fit it on more plans (n_samples) or use predictor='table'. Finalists are "
               "still re-measured, so the budget holds for the returned plan")
        warnings.warn(msg, stacklevel=2)
        notes.append(msg)
    if budget >= dense_pred:
        msg = (f"budget {budget:.4g} ms is above the dense model's predicted {dense_pred:.4g} ms: "
               "every plan is feasible")
        warnings.warn(msg, stacklevel=2)
        notes.append(msg)

    # run dir, storage, evaluator ----------------------------------------------------------------
    stem = _run_stem(spec, device_name, budget, strat.name)
    rd = Path(run_dir) if run_dir is not None else None
    if rd is not None:
        rd.mkdir(parents=True, exist_ok=True)
    study_name = study_name or stem
    st = _storage(storage, rd)
    from autoprune.evaluators import ImportanceProxy

    importance = ImportanceProxy(model, spec).fit()
    proxy = _CachedProxy(evaluator if evaluator is not None else importance, model,
                         example_inputs, spec)
    problem = SearchProblem(space=space, latency_ms=latency_ms, proxy=proxy, budget_ms=budget,
                            storage=st, study_name=study_name, seed=seed, importance=importance)

    # search ----------------------------------------------------------------------------------------
    from autoprune.storage import fail_stale_trials

    study0 = _peek_study(st, study_name)
    initial = 0
    if study0 is not None:
        fail_stale_trials(study0, assume_single_worker=storage is None)
        initial = SearchProblem.n_done(problem, study0)
    bar = _Progress(n_trials, min(initial, n_trials), budget, progress)
    problem.callbacks.append(bar)
    t0 = time.perf_counter()
    try:
        study = strat.run(problem, n_trials, timeout_s=timeout_s)
    finally:
        bar.close()
    wall_s = time.perf_counter() - t0
    log.info("search: %d trials in %.1f s", len(study.trials), wall_s)

    trials = trials_frame(study, spec, budget, dense_pred)
    _add_intervals(trials, study, as_latency_model(predictor))
    dense_proxy = proxy.dense()
    result = SearchResult(trials=trials, best_plan=None, dense_latency_ms=float("nan"),
                          budget_ms=budget, dense_predicted_ms=dense_pred,
                          dense_proxy=dense_proxy, strategy=strat.name, study_name=study_name,
                          run_dir=rd, device=device_name, notes=notes, space=space.to_dict())
    _finalists(result, study, model, example_inputs, spec, backend, n_finalists,
               max_remeasure, verify_finalists)
    if rd is not None:
        result.save(rd)
    return result


def _check_table_device(table: Any, backend: Any) -> None:
    """A table measured on another device (or runtime, threads, precision) is refused."""
    tdev = getattr(table, "device", None) if table is not None else None
    info = getattr(backend, "device_info", None)
    if tdev is None or info is None or not hasattr(tdev, "device_id"):
        return
    bdev = info()
    if bdev.device_id != tdev.device_id:
        from autoprune.errors import TableMismatchError

        fields = bdev.diff(tdev) or ["device_id"]
        details = ", ".join(f"{f}: table {tdev.to_dict().get(f)!r} vs backend "
                            f"{bdev.to_dict().get(f)!r}" for f in fields)
        where = getattr(table, "path", None)
        name = f"{tdev.device_id}" + (f" at {where}" if where is not None else "")
        why = (f"it was measured on {tdev.arch}, this search runs on {bdev.arch}; "
               if tdev.arch != bdev.arch else "")
        raise TableMismatchError(
            f"refused latency table {name}: {why}it was measured on another device or setup "
            f"({details}); profile this device (autoprune.profile) or pass the matching backend"
        )


def _peek_study(storage: Any, study_name: str) -> optuna.Study | None:
    import optuna

    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return None


def _candidates(trials: pd.DataFrame) -> list[tuple[int, str]]:
    """(trial number, role) in re-measure order: best proxy, knee, then by proxy; one per plan."""
    feas = trials[(trials["state"] == "COMPLETE") & trials["feasible"]]
    if feas.empty:
        return []
    by_proxy = feas.sort_values(["proxy", "predicted_latency_ms"], ascending=[False, True])
    order: list[tuple[int, str]] = [(int(by_proxy["trial"].iloc[0]), "best")]
    front = pareto_front(trials)
    k = knee_index(front)
    if k is not None:
        order.append((int(front["trial"].iloc[k]), "knee"))
    for n in by_proxy["trial"].iloc[1:]:
        order.append((int(n), "next"))
    return order


def _finalists(result: SearchResult, study: optuna.Study, model: nn.Module,
               example_inputs: Any, spec: ModelSpec, backend: Any, n_finalists: int,
               max_remeasure: int, verify: bool) -> None:
    trials = result.trials
    plans: dict[int, PruningPlan] = {}
    seen: set[str] = set()
    order: list[tuple[int, str]] = []
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    for n, role in _candidates(trials):
        d = by_number[n].user_attrs.get("plan")
        if d is None:
            continue
        key = json.dumps(d, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        plans[n] = PruningPlan.from_dict(d)
        order.append((n, role))
    if not order:
        msg = ("no trial is predicted within the budget: run more trials, or raise the budget "
               "(the fastest plan's predicted latency is the lower bound)")
        warnings.warn(msg, stacklevel=3)
        result.notes.append(msg)
        result.finalists = pd.DataFrame(columns=_FINALIST_COLUMNS)
        return
    rows: list[dict[str, Any]] = []
    tr = trials.set_index("trial")
    if not verify:
        n, role = order[0]
        result.best_plan = plans[n]
        result.finalists = pd.DataFrame([_frow(tr, n, role, plans[n], float("nan"),
                                               float("nan"), None, True)],
                                        columns=_FINALIST_COLUMNS)
        result.notes.append("finalists were not re-measured (verify_finalists=False)")
        return
    from autoprune.executor import apply_plan

    dense_model = copy.deepcopy(model).eval()
    # the dense reference: median of three separate measurements (one burst of load on a
    # shared machine must not move every finalist's absolute latency)
    dense_runs = [float(backend.measure_model(dense_model, example_inputs).median_ms)
                  for _ in range(3)]
    dense_ms = float(np.median(dense_runs))
    result.dense_latency_ms = dense_ms
    if max(dense_runs) > 1.25 * min(dense_runs):
        result.notes.append(
            f"dense latency varied between measurements ({min(dense_runs):.4g} to "
            f"{max(dense_runs):.4g} ms): the device is noisy; finalists use the median "
            f"{dense_ms:.4g} ms x their paired ratio")
    limit = max(n_finalists, min(max_remeasure, len(order)))
    met = 0
    for i, (n, role) in enumerate(order):
        if i >= n_finalists and (met > 0 or i >= limit):
            break
        pruned = apply_plan(model, plans[n], example_inputs, spec=spec).eval()
        ratio, iqr = backend.measure_ratio(pruned, dense_model, example_inputs)
        measured = float(ratio) * dense_ms
        ok = measured <= result.budget_ms
        met += int(ok)
        if not ok:
            msg = (f"trial {n} ({role}): measured {measured:.4g} ms (ratio {ratio:.3f} x dense "
                   f"{dense_ms:.4g} ms) misses the {result.budget_ms:.4g} ms budget "
                   f"(predicted {tr.loc[n, 'predicted_latency_ms']:.4g} ms); trying the next "
                   "candidate")
            warnings.warn(msg, stacklevel=3)
            result.notes.append(msg)
        rows.append(_frow(tr, n, role, plans[n], measured, float(ratio), float(iqr), ok))
        result.trials.loc[result.trials["trial"] == n, "measured_latency_ms"] = measured
    fin = pd.DataFrame(rows, columns=_FINALIST_COLUMNS)
    passing = fin[fin["meets_budget"]]
    if passing.empty:
        msg = (f"none of the {len(fin)} re-measured candidates met the {result.budget_ms:.4g} ms "
               f"budget on the device (dense measured {dense_ms:.4g} ms): best_plan is None; "
               "lower the budget passed to the search by the predictor's error, or re-profile")
        warnings.warn(msg, stacklevel=3)
        result.notes.append(msg)
    else:
        best_n = int(passing.sort_values("proxy", ascending=False)["trial"].iloc[0])
        result.best_plan = plans[best_n]
        fin.loc[fin["trial"] == best_n, "chosen"] = True
    result.finalists = fin


_FINALIST_COLUMNS = ["trial", "role", "proxy", "predicted_latency_ms", "measured_latency_ms",
                     "measured_ratio", "ratio_iqr", "meets_budget", "chosen", "plan"]


def _frow(tr: pd.DataFrame, n: int, role: str, plan: PruningPlan, measured: float,
          ratio: float, iqr: float | None, ok: bool) -> dict[str, Any]:
    return {
        "trial": n, "role": role, "proxy": float(tr.loc[n, "proxy"]),
        "predicted_latency_ms": float(tr.loc[n, "predicted_latency_ms"]),
        "measured_latency_ms": measured, "measured_ratio": ratio,
        "ratio_iqr": float("nan") if iqr is None else iqr, "meets_budget": bool(ok),
        "chosen": bool(ok and not math.isfinite(measured)),
        "plan": plan.to_json(indent=None),
    }
