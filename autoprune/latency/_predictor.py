"""Whole-network latency predictor: latency-table sums corrected by a model of measured latency.

The search scores thousands of plans; it cannot measure each one. ``LatencyPredictor`` predicts
the end-to-end latency of a pruned variant from two parts:

* the **table part**: the sum over the model's layers, at the plan's widths and structures, of
  the per-layer latencies in a :class:`~autoprune.latency._table.LatencyTable` (the table interpolates
  between its grid widths and follows its explicit miss policy);
* the **correction part**: a scikit-learn regressor trained on end-to-end latencies *measured on
  the device* for random plans spread over the whole width/structure range. Its features come
  from the table and the graph (per-op-kind table sums, MACs, parameters, activation elements,
  layer counts, the share of misaligned widths), not from FLOPs alone.

``fit`` holds out part of the measured plans and reports in ``report_`` how often held-out
plans fall within ±5% / ±10% of their measured latency, the mean absolute percentage error and
the Spearman rank correlation, for the predictor and, side by side, for the plain table sum and a
FLOPs-linear model. The measured dataset is a CSV (plan JSON, measurements, features, split)
plus a JSON sidecar, written atomically; :meth:`LatencyPredictor.load` refits from it
deterministically (no pickled models).

Prediction is vectorised: plans are encoded into arrays of kept units, the per-layer widths are
computed with numpy, and each distinct (layer, widths, structure) is looked up in the table only
once and cached, so ``predict_many`` scores tens of thousands of plans per second on one core.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from autoprune.errors import (
    CorruptFileError,
    InvalidInputError,
    InvalidPlanError,
    NotFittedError,
    TableMismatchError,
)
from autoprune.plan import GroupPlan, PruningPlan
from autoprune.types import LayerSpec, ModelSpec, OpKind, Structure

if TYPE_CHECKING:
    import pandas as pd

DATASET_SCHEMA_VERSION = 1

RegressorName = Literal["auto", "linear", "boosted", "gbr"]
Statistic = Literal["median", "min"]
MissPolicy = Literal["raise", "measure", "interpolate"]


class Regressor(str, Enum):
    """Correction models. ``linear`` and ``boosted`` are monotone in every width when the table
    is; ``gbr`` is more flexible (it also sees misalignment features) but not monotone."""

    AUTO = "auto"  #: pick by k-fold cross-validation on the training plans
    LINEAR = "linear"  #: non-negative linear model of table sums per op kind, MACs, params, ...
    BOOSTED = "boosted"  #: ``linear`` + monotone-constrained gradient boosting on its residual
    GBR = "gbr"  #: gradient boosting of measured / table-sum ratio on all features

    def __str__(self) -> str:
        return self.value

    @property
    def monotone(self) -> bool:
        return self in (Regressor.LINEAR, Regressor.BOOSTED)


_STRUCT_CODE = {Structure.NONE: 0, Structure.CHANNEL: 1, Structure.NM: 2,
                Structure.UNSTRUCTURED: 3, Structure.BLOCK: 4}
_CODE_STRUCT = {v: k for k, v in _STRUCT_CODE.items()}
_METHODS = ("predictor", "table_sum", "flops_linear")
_REPORT_COLUMNS = ("within_5pct", "within_10pct", "mape", "spearman", "n_holdout")


# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------
def accuracy_metrics(measured_ms: np.ndarray, predicted_ms: np.ndarray) -> dict[str, float]:
    """Share within ±5% and ±10%, mean absolute percentage error (a fraction) and Spearman's
    rank correlation of ``predicted_ms`` against ``measured_ms``."""
    from scipy.stats import spearmanr

    y = np.asarray(measured_ms, dtype=float)
    p = np.asarray(predicted_ms, dtype=float)
    rel = np.abs(p - y) / y
    rho = float(spearmanr(y, p).statistic) if len(y) > 2 and np.ptp(p) > 0 else float("nan")
    return {
        "within_5pct": float(np.mean(rel <= 0.05)),
        "within_10pct": float(np.mean(rel <= 0.10)),
        "mape": float(np.mean(rel)),
        "spearman": rho,
        "n_holdout": int(len(y)),
    }


# ------------------------------------------------------------------------------------------
# Plan encoding: plans -> arrays -> per-layer widths
# ------------------------------------------------------------------------------------------
@dataclass
class _EncodedPlans:
    kept: np.ndarray  # [P, G] kept units per channel group
    struct: np.ndarray  # [P, G] structure code per channel group
    density: np.ndarray  # [P, G] kept weight share (nm / unstructured)
    removed: np.ndarray  # [P, B] block removed


class _Compiled:
    """A ``ModelSpec`` turned into index arrays that price many plans at once."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.fingerprint = spec.fingerprint  # a hash over every layer: compute it once
        chan = [g for g in spec.groups.values() if g.kind == "channel"]
        self.group_names = [g.name for g in chan]
        self.group_index = {n: i for i, n in enumerate(self.group_names)}
        self.units = np.array([g.units for g in chan], dtype=np.int64)
        self.min_units = np.array([g.min_units for g in chan], dtype=np.int64)
        self.block_names = [g.name for g in spec.groups.values() if g.kind == "block"]
        self.block_index = {n: i for i, n in enumerate(self.block_names)}
        self.layer_names = list(spec.layers)
        self.layer_specs: list[LayerSpec] = [lay.spec for lay in spec.layers.values()]
        self.ops: list[OpKind] = [s.op for s in self.layer_specs]

        def segs(segments: tuple[tuple[str | None, int], ...]) -> list[tuple[int, int]]:
            return [(self.group_index.get(g, -1) if g is not None else -1, int(c))
                    for g, c in segments]

        self.in_segs = [segs(lay.in_segments) for lay in spec.layers.values()]
        self.out_segs = [segs(lay.out_segments) for lay in spec.layers.values()]
        self.layer_block = np.array(
            [self.block_index.get(lay.block, -1) if lay.block is not None else -1
             for lay in spec.layers.values()], dtype=np.int64)
        # layer -> channel-group indices whose nm/unstructured masks land on its weights
        mask_groups: dict[str, list[int]] = {}
        for g in spec.groups.values():
            if g.name in self.group_index:
                for p in g.producers:
                    mask_groups.setdefault(p, []).append(self.group_index[g.name])
        self.mask_groups = [mask_groups.get(n, []) for n in self.layer_names]

    # -- plans -> arrays ------------------------------------------------------------------
    def encode(self, plans: Sequence[PruningPlan]) -> _EncodedPlans:
        n_p, n_g, n_b = len(plans), len(self.group_names), len(self.block_names)
        fp = self.fingerprint
        gindex, bindex = self.group_index, self.block_index
        aligns: list[int] = []
        owner: list[int] = []  # plan index of each (group name, GroupPlan) below
        names: list[str] = []
        gps: list[GroupPlan] = []
        ai: list[int] = []
        aj: list[int] = []
        av: list[int] = []
        for i, plan in enumerate(plans):
            if not isinstance(plan, PruningPlan):
                raise InvalidInputError(
                    f"plans must be PruningPlan objects, got {type(plan).__name__} at index {i}; "
                    "load JSON plans with PruningPlan.from_json"
                )
            if plan.model_fingerprint is not None and plan.model_fingerprint != fp:
                raise InvalidPlanError(
                    f"plan {i} was made for another model ({plan.model_name or '?'}, fingerprint "
                    f"{plan.model_fingerprint}); this predictor is for {self.spec.model_name} "
                    f"with fingerprint {fp}"
                )
            aligns.append(plan.alignment)
            if plan.alignments:
                for name, a in plan.alignments.items():
                    j = gindex.get(name)
                    if j is not None:
                        ai.append(i)
                        aj.append(j)
                        av.append(a)
            g = plan.groups
            names.extend(g)
            gps.extend(g.values())
            owner.extend([i] * len(g))
        # bulk conversion: one comprehension per field is far cheaper than per-item work
        codes = _STRUCT_CODE
        plan_i = np.asarray(owner, dtype=np.int64)
        gj = np.asarray([gindex.get(n, -1) for n in names], dtype=np.int64)
        bj = np.asarray([bindex.get(n, -1) for n in names], dtype=np.int64)
        code = np.asarray([codes[gp.structure] for gp in gps], dtype=np.int64)
        val = np.asarray([gp.keep_ratio for gp in gps], dtype=float)
        unknown = (gj < 0) & (bj < 0)
        if unknown.any():
            k = int(np.flatnonzero(unknown)[0])
            raise InvalidPlanError(
                f"plan {int(plan_i[k])}: unknown group {names[k]!r} for model "
                f"{self.spec.model_name}; validate the plan with plan.validate(spec)"
            )
        bad = (gj >= 0) & (code == 4)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise InvalidPlanError(
                f"plan {int(plan_i[k])}: group {names[k]!r} is a channel group; 'block' is "
                "allowed only for block groups"
            )
        align = np.repeat(np.asarray(aligns, dtype=np.int64)[:, None], n_g, axis=1)
        align[ai, aj] = av
        ch = gj >= 0
        struct = np.zeros((n_p, n_g), dtype=np.int64)
        struct[plan_i[ch], gj[ch]] = code[ch]
        value = np.ones((n_p, n_g))
        value[plan_i[ch], gj[ch]] = val[ch]
        ratio = np.where(struct == 1, value, 1.0)
        density = np.where((struct == 2) | (struct == 3), value, 1.0)
        removed = np.zeros((n_p, n_b), dtype=bool)
        bl = (bj >= 0) & (code == 4)
        removed[plan_i[bl], bj[bl]] = True
        return _EncodedPlans(self._keep_units(ratio, align, struct), struct, density, removed)

    def _keep_units(self, ratio: np.ndarray, align: np.ndarray, struct: np.ndarray) -> np.ndarray:
        """Vectorised ``autoprune.plan.keep_units`` (same rounding: half to even)."""
        units = np.broadcast_to(self.units, ratio.shape)
        k = np.maximum(1, np.rint(units * ratio)).astype(np.int64)
        snap = (align > 1) & (units > align)
        snapped = np.rint(k / np.where(align > 0, align, 1)).astype(np.int64) * align
        snapped = np.minimum(np.maximum(align, snapped), units)
        k = np.where(snap, snapped, k)
        k = np.maximum(np.minimum(self.min_units, units), k)
        k = np.where(k >= units, units, k)
        k = np.where(units <= 0, units, k)
        return np.where(struct == 1, k, units)

    # -- arrays -> per-layer widths -------------------------------------------------------
    def layer_arrays(self, enc: _EncodedPlans) -> tuple[np.ndarray, ...]:
        """(cin, cout, struct code, density, present), each [P, L]."""
        n_p, n_l = enc.kept.shape[0], len(self.layer_names)
        units = self.units

        def width(segs: list[tuple[int, int]]) -> np.ndarray:
            w = np.zeros(n_p, dtype=np.int64)
            for g, ch in segs:
                w += ch if g < 0 else (ch * enc.kept[:, g]) // units[g]
            return w

        cin = np.stack([width(s) for s in self.in_segs], axis=1) if n_l else np.zeros((n_p, 0))
        cout = np.stack([width(s) for s in self.out_segs], axis=1) if n_l else np.zeros((n_p, 0))
        lstruct = np.zeros((n_p, n_l), dtype=np.int64)
        ldens = np.ones((n_p, n_l))
        for j, gs in enumerate(self.mask_groups):
            for g in gs:
                masked = (enc.struct[:, g] == 2) | (enc.struct[:, g] == 3)
                lstruct[:, j] = np.where(masked, enc.struct[:, g], lstruct[:, j])
                ldens[:, j] = np.where(masked, enc.density[:, g], ldens[:, j])
        present = np.ones((n_p, n_l), dtype=bool)
        for j, b in enumerate(self.layer_block):
            if b >= 0:
                present[:, j] = ~enc.removed[:, b]
        return cin, cout, lstruct, ldens, present


# ------------------------------------------------------------------------------------------
# Regressors (all deterministic given random_state)
# ------------------------------------------------------------------------------------------
class _LinearModel:
    """Non-negative linear model fitted on relative error (weights 1/y^2); monotone features
    with non-negative coefficients give a prediction monotone in every width."""

    def __init__(self) -> None:
        from sklearn.linear_model import LinearRegression

        self.model = LinearRegression(positive=True)
        self.scale: np.ndarray | None = None

    def fit(self, x: np.ndarray, y: np.ndarray) -> _LinearModel:
        self.scale = np.maximum(np.abs(x).max(axis=0), 1e-12)
        self.model.fit(x / self.scale, y, sample_weight=1.0 / y**2)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        # the same arithmetic as LinearRegression.predict without its per-call validation
        return (x / self.scale) @ self.model.coef_ + self.model.intercept_


class _BoostedModel:
    """``_LinearModel`` plus gradient boosting of its residual under monotone constraints."""

    def __init__(self, random_state: int) -> None:
        self.random_state = random_state
        self.linear = _LinearModel()
        self.trees: Any = None

    def fit(self, x: np.ndarray, y: np.ndarray) -> _BoostedModel:
        from sklearn.ensemble import HistGradientBoostingRegressor

        self.linear.fit(x, y)
        resid = y - self.linear.predict(x)
        self.trees = HistGradientBoostingRegressor(
            learning_rate=0.1, max_iter=100, max_leaf_nodes=6,
            min_samples_leaf=max(3, len(y) // 25), l2_regularization=1.0,
            monotonic_cst=[1] * x.shape[1], early_stopping=False,
            random_state=self.random_state,
        )
        self.trees.fit(x, resid, sample_weight=1.0 / y**2)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.linear.predict(x) + self.trees.predict(x)


class _RatioGBR:
    """Gradient boosting of measured / table-sum, on every feature (not monotone)."""

    def __init__(self, random_state: int, table_col: int) -> None:
        self.random_state, self.table_col = random_state, table_col
        self.model: Any = None

    def fit(self, x: np.ndarray, y: np.ndarray) -> _RatioGBR:
        from sklearn.ensemble import GradientBoostingRegressor

        self.model = GradientBoostingRegressor(
            n_estimators=300, max_depth=3, learning_rate=0.05, subsample=0.8,
            min_samples_leaf=3, random_state=self.random_state,
        )
        self.model.fit(x, y / x[:, self.table_col])
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict(x) * x[:, self.table_col]


# ------------------------------------------------------------------------------------------
# The predictor
# ------------------------------------------------------------------------------------------
class LatencyPredictor:
    """Predict a pruned model's end-to-end latency (ms) on one device from a plan.

    Parameters (stored as given; checked in :meth:`fit`):

    regressor: ``"auto"`` (cross-validated choice among the allowed ones), ``"linear"``,
        ``"boosted"`` or ``"gbr"`` (see :class:`Regressor`).
    monotone: allow only regressors that are monotone in width when the table is (``linear``,
        ``boosted``); ``regressor="gbr"`` with ``monotone=True`` is an error.
    holdout: share of measured plans kept out of fitting for ``report_``.
    n_samples: plans to measure (the dense model included), before active sampling.
    miss_policy: passed to ``LatencyTable.lookup`` for widths the table has not measured.
    random_state: seed for plan sampling, the split and the regressors.
    active: after the first fit, measure more plans near the held-out plans with the largest
        error until ``target_within_10`` of held-out plans are within ±10% or ``max_samples``
        plans are measured. Held-out plans themselves are never used for fitting.
    paired: time every chunk of plans interleaved with the dense model and fit on
        ``measured / dense-in-same-chunk x median dense``, which cancels drift on a shared
        machine (DESIGN §5). Raw medians are stored as well.
    statistic: what a measurement contributes: ``"median"`` (default, DESIGN §5) or ``"min"``
        (the fastest run: far steadier than the median when other jobs preempt the timed
        runs; both are stored, so switching needs no new measurements).
    structures: structures to sample (None: all a group allows). min_keep_ratio,
        block_probability: range of the sampled plans. aligned_share: share of sampled plans
        whose widths snap to the table's alignment (the rest keep any width). The default 1.0
        matches the search space, which snaps to the table's alignment; on devices where an
        unaligned width costs more than the next aligned one (ONNX Runtime on AVX-512: the
        table's interpolation rounds up and cannot see it) sample unaligned plans only with
        ``monotone=False`` so that ``gbr`` can use the misalignment features.
    cv_folds: folds for ``regressor="auto"``. chunk_size: plans per interleaved measurement.

    Fitted attributes: ``spec_``, ``table_``, ``dataset_`` (DataFrame), ``report_`` (DataFrame,
    rows ``predictor`` / ``table_sum`` / ``flops_linear``, columns ``within_5pct``,
    ``within_10pct``, ``mape`` (fractions), ``spearman``, ``n_holdout``; computed on the
    held-out plans only), ``regressor_`` (the chosen name), ``cv_scores_``,
    ``feature_names_``, ``dense_ms_``, ``fit_seconds_``, ``n_measured_``, ``data_path_``.
    The regressor is fitted on the training plans only, so ``report_`` describes exactly the
    model that predicts.
    """

    def __init__(
        self,
        regressor: RegressorName | Regressor = "auto",
        *,
        monotone: bool = True,
        holdout: float = 0.25,
        n_samples: int = 120,
        miss_policy: MissPolicy = "interpolate",
        random_state: int = 0,
        active: bool = False,
        target_within_10: float = 0.95,
        max_samples: int = 240,
        paired: bool = True,
        statistic: Statistic = "median",
        structures: tuple[Structure | str, ...] | None = None,
        min_keep_ratio: float = 0.1,
        block_probability: float = 0.15,
        aligned_share: float = 1.0,
        cv_folds: int = 5,
        chunk_size: int = 8,
    ) -> None:
        self.regressor = regressor
        self.monotone = monotone
        self.holdout = holdout
        self.n_samples = n_samples
        self.miss_policy = miss_policy
        self.random_state = random_state
        self.active = active
        self.target_within_10 = target_within_10
        self.max_samples = max_samples
        self.paired = paired
        self.statistic = statistic
        self.structures = structures
        self.min_keep_ratio = min_keep_ratio
        self.block_probability = block_probability
        self.aligned_share = aligned_share
        self.cv_folds = cv_folds
        self.chunk_size = chunk_size

    # -- parameters -----------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        return {
            "regressor": str(Regressor(self.regressor)) if isinstance(self.regressor, Regressor)
            else self.regressor,
            "monotone": self.monotone, "holdout": self.holdout, "n_samples": self.n_samples,
            "miss_policy": self.miss_policy, "random_state": self.random_state,
            "active": self.active, "target_within_10": self.target_within_10,
            "max_samples": self.max_samples, "paired": self.paired,
            "statistic": self.statistic,
            "structures": None if self.structures is None
            else [Structure(s).value for s in self.structures],
            "min_keep_ratio": self.min_keep_ratio, "block_probability": self.block_probability,
            "aligned_share": self.aligned_share, "cv_folds": self.cv_folds,
            "chunk_size": self.chunk_size,
        }

    def _check_params(self) -> None:
        try:
            reg = Regressor(self.regressor)
        except ValueError:
            raise InvalidInputError(
                f"unknown regressor {self.regressor!r}; allowed: "
                f"{', '.join(r.value for r in Regressor)}"
            ) from None
        if self.monotone and reg == Regressor.GBR:
            raise InvalidInputError(
                "regressor 'gbr' is not monotone in width; pass monotone=False to use it, or "
                "regressor='boosted' for a monotone flexible model"
            )
        if not 0.0 < float(self.holdout) < 1.0:
            raise InvalidInputError(f"holdout must be in (0, 1), got {self.holdout!r}")
        if int(self.n_samples) < 10:
            raise InvalidInputError(f"n_samples must be >= 10, got {self.n_samples!r}")
        if self.miss_policy not in ("raise", "measure", "interpolate"):
            raise InvalidInputError(
                f"miss_policy must be 'raise', 'measure' or 'interpolate', got "
                f"{self.miss_policy!r}"
            )
        if not 0.0 < float(self.target_within_10) <= 1.0:
            raise InvalidInputError(
                f"target_within_10 must be in (0, 1], got {self.target_within_10!r}"
            )
        if self.active and int(self.max_samples) < int(self.n_samples):
            raise InvalidInputError(
                f"max_samples ({self.max_samples}) must be >= n_samples ({self.n_samples})"
            )
        if not 0.0 < float(self.min_keep_ratio) <= 1.0:
            raise InvalidInputError(
                f"min_keep_ratio must be in (0, 1], got {self.min_keep_ratio!r}"
            )
        if int(self.cv_folds) < 2:
            raise InvalidInputError(f"cv_folds must be >= 2, got {self.cv_folds!r}")
        if self.statistic not in ("median", "min"):
            raise InvalidInputError(
                f"statistic must be 'median' or 'min', got {self.statistic!r}"
            )
        if not 0.0 <= float(self.aligned_share) <= 1.0:
            raise InvalidInputError(
                f"aligned_share must be in [0, 1], got {self.aligned_share!r}"
            )
        if int(self.chunk_size) < 1:
            raise InvalidInputError(f"chunk_size must be >= 1, got {self.chunk_size!r}")

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise NotFittedError(
                "this LatencyPredictor is not fitted yet; call fit(table=..., model=..., "
                "example_inputs=..., backend=...) or LatencyPredictor.load(path) first"
            )

    # -- fit --------------------------------------------------------------------------------
    def fit(
        self,
        table: Any = None,
        model: Any = None,
        example_inputs: Any = None,
        backend: Any = None,
        *,
        spec: ModelSpec | None = None,
        dataset: pd.DataFrame | str | Path | None = None,
        data_path: str | Path | None = None,
        progress: bool = True,
    ) -> LatencyPredictor:
        """Measure random plans on ``backend`` (or take ``dataset``), fit the correction on
        part of them and report accuracy on the rest. Returns ``self``.

        ``table``: the model's latency table (anything with ``lookup(spec, structure, density,
        policy=...)``). ``spec``: the model's ``ModelSpec`` (``analyze``\\ d from ``model`` if
        None). ``dataset``: a measured dataset (DataFrame or CSV path written by ``save``) to
        fit on instead of measuring. ``data_path``: CSV to store the dataset at (default: next
        to the table, if the table has a directory); an existing file there for the same model
        is resumed, only the missing plans are measured.
        """
        import pandas as pd

        self._check_params()
        t0 = time.perf_counter()
        if table is None:
            raise InvalidInputError(
                "fit needs table= (a LatencyTable from autoprune.profile for this model and "
                "device)"
            )
        if spec is None:
            if model is None or example_inputs is None:
                raise InvalidInputError(
                    "fit needs spec= or model= and example_inputs= to analyse the model"
                )
            from autoprune.analyze import analyze

            spec = analyze(model, example_inputs)
        self._setup(spec, table)
        if data_path is None:
            data_path = self._default_data_path(table)
        self.data_path_ = Path(data_path) if data_path is not None else None

        rows: pd.DataFrame
        if dataset is not None:
            rows = self._read_dataset(dataset) if not isinstance(dataset, pd.DataFrame) \
                else dataset.copy()
            self._check_dataset(rows)
        else:
            if model is None or example_inputs is None or backend is None:
                raise InvalidInputError(
                    "fit needs model=, example_inputs= and backend= to measure plans (or "
                    "dataset= with measured plans)"
                )
            rows = self._load_existing(self.data_path_)
            rng = np.random.default_rng(self.random_state)
            plans = self._sample_plans(rng, int(self.n_samples))
            done = set(rows["plan_json"]) if len(rows) else set()
            todo = [p for p in plans if _plan_key(p) not in done][: max(
                0, int(self.n_samples) - len(rows))]
            if todo:
                new = self._measure(todo, model, example_inputs, backend, progress,
                                    first_chunk=_next_chunk(rows), existing=rows)
                rows = pd.concat([rows, new], ignore_index=True) if len(rows) else new
                self._save_rows(rows)
        self._fit_rows(rows)
        if self.active and dataset is None:
            self._active_loop(model, example_inputs, backend, progress)
        if self.data_path_ is not None:  # the fitted state: features, split, chosen regressor
            self._write(self.data_path_, self.dataset_)
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _setup(self, spec: ModelSpec, table: Any) -> None:
        self.spec_ = spec
        self.table_ = table
        self._compiled = _Compiled(spec)
        self._cache: dict[tuple[int, int, int, int, float], tuple[float, ...]] = {}
        self.kinds_ = sorted({op.value for op in self._compiled.ops})
        accelerated = getattr(table, "accelerated", None)
        self._accelerated = np.array(
            [True, True] + [bool(accelerated(_CODE_STRUCT[c])) if callable(accelerated) else True
                            for c in (2, 3)] + [True])
        align = int(getattr(table, "alignment", 0) or 0)
        self.alignment_ = align if align > 1 else 16
        self.feature_names_ = self._feature_names()
        dense = self.features([PruningPlan.dense(spec)])
        self.dense_table_ms_ = float(dense["table_ms"].iloc[0])
        self.dense_macs_ = float(dense["macs_m"].iloc[0])

    def _default_data_path(self, table: Any) -> Path | None:
        for attr in ("directory", "path", "root"):
            d = getattr(table, attr, None)
            if d:
                d = Path(d)
                if d.suffix:  # a file: keep the dataset beside it
                    d = d.parent
                return d / f"predictor_{self.spec_.model_name}_{self.spec_.fingerprint}.csv"
        return None

    # -- sampling -----------------------------------------------------------------------------
    def _sample_plans(self, rng: np.random.Generator, n: int) -> list[PruningPlan]:
        """The dense plan, then random plans: half with independent per-group keep ratios,
        half around a shared level (so whole-network latency spreads over the full range);
        ``aligned_share`` of them snapped to the table's alignment. Plans that price the same
        (same kept widths, structures and removed blocks) are measured once."""
        plans = [PruningPlan.dense(self.spec_)]
        seen = {self._signature(plans[0])}
        tries = 0
        while len(plans) < n and tries < 50 * n:
            tries += 1
            plan = self._random_plan(rng, leveled=bool(rng.random() < 0.5))
            sig = self._signature(plan)
            if sig not in seen:
                seen.add(sig)
                plans.append(plan)
        return plans

    def _signature(self, plan: PruningPlan) -> bytes:
        enc = self._compiled.encode([plan])
        return (enc.kept.tobytes() + enc.struct.tobytes() + np.round(enc.density, 4).tobytes()
                + enc.removed.tobytes())

    def _random_plan(self, rng: np.random.Generator, leveled: bool) -> PruningPlan:
        """Per channel group: ``channel`` with probability 0.6 (when allowed), else another
        allowed structure (``none`` included); keep ratios uniform in [min_keep_ratio, 1] or,
        when ``leveled``, spread around one level drawn for the whole plan."""
        spec = self.spec_
        align = self.alignment_ if rng.random() < float(self.aligned_share) else 1
        wanted = None if self.structures is None else {Structure(s) for s in self.structures}
        lo = float(self.min_keep_ratio)
        level = rng.uniform(lo, 1.0)
        plan = PruningPlan(alignment=align, model_fingerprint=spec.fingerprint,
                           model_name=spec.model_name)
        for g in spec.groups.values():
            allowed = [s for s in g.allowed if wanted is None or s in wanted or s == Structure.NONE]
            if g.kind == "block":
                if Structure.BLOCK in allowed and rng.random() < float(self.block_probability):
                    plan.groups[g.name] = GroupPlan(Structure.BLOCK)
                continue
            others = [s for s in allowed if s not in (Structure.CHANNEL, Structure.BLOCK)]
            if Structure.CHANNEL in allowed and (not others or rng.random() < 0.6):
                s = Structure.CHANNEL
            elif others:
                s = others[int(rng.integers(len(others)))]
            else:
                continue
            if s == Structure.NONE:
                continue
            if leveled:
                r = min(1.0, max(lo, level * math.exp(rng.normal(0.0, 0.2))))
            else:
                r = float(rng.uniform(lo, 1.0))
            plan.groups[g.name] = GroupPlan(s, float(r))
        return plan

    def _neighbours(self, plan: PruningPlan, rng: np.random.Generator, n: int) -> list[PruningPlan]:
        """Plans near ``plan``: every channel/unstructured keep ratio jittered by ~±10%."""
        out = []
        for _ in range(n):
            p = PruningPlan.from_dict(plan.to_dict())
            for gp in p.groups.values():
                if gp.structure in (Structure.CHANNEL, Structure.UNSTRUCTURED):
                    r = gp.keep_ratio * math.exp(rng.normal(0.0, 0.1))
                    gp.keep_ratio = float(min(1.0, max(float(self.min_keep_ratio), r)))
            out.append(p)
        return out

    # -- measuring ----------------------------------------------------------------------------
    def _measure(
        self, plans: list[PruningPlan], model: Any, example_inputs: Any, backend: Any,
        progress: bool, first_chunk: int = 0, existing: pd.DataFrame | None = None,
        split: str | None = None,
    ) -> pd.DataFrame:
        """Measure ``plans`` in chunks (each timed interleaved with the dense model when
        ``paired``); after every chunk, ``existing`` + the new rows are checkpointed to
        ``data_path_`` so a killed fit resumes where it stopped."""
        import pandas as pd
        from tqdm.auto import tqdm

        from autoprune.executor import apply_plan

        records: list[dict[str, Any]] = []
        chunk = int(self.chunk_size)
        bar = tqdm(total=len(plans), desc=f"measuring {self.spec_.model_name} plans",
                   disable=not progress, unit="plan")
        for start in range(0, len(plans), chunk):
            part = plans[start:start + chunk]
            t = time.perf_counter()
            pruned = [_apply(apply_plan, model, p, example_inputs, self.spec_) for p in part]
            prepare = (time.perf_counter() - t) / max(1, len(part))
            t = time.perf_counter()
            if self.paired:
                if hasattr(backend, "measure_interleaved"):
                    samples = list(backend.measure_interleaved([model, *pruned], example_inputs))
                else:
                    samples = [backend.measure_model(model, example_inputs)]
                    samples += [backend.measure_model(m, example_inputs) for m in pruned]
                ref, samples = samples[0], samples[1:]
            else:
                ref = None
                samples = [backend.measure_model(m, example_inputs) for m in pruned]
            seconds = (time.perf_counter() - t) / max(1, len(part))
            for p, s in zip(part, samples):
                records.append({
                    "plan_json": _plan_key(p),
                    "measured_ms": float(s.median_ms),
                    "iqr_ms": float(s.iqr_ms),
                    "n_runs": int(s.n_runs),
                    "min_ms": float(s.min_ms),
                    "ref_min_ms": float(ref.min_ms) if ref is not None else float("nan"),
                    "ref_ms": float(ref.median_ms) if ref is not None else float("nan"),
                    "ref_iqr_ms": float(ref.iqr_ms) if ref is not None else float("nan"),
                    "chunk": first_chunk + start // chunk,
                    "measure_seconds": seconds,
                    "prepare_seconds": prepare,
                    **({"split": split} if split is not None else {}),
                })
            new = pd.DataFrame.from_records(records)
            self._save_rows(new if existing is None or not len(existing)
                            else pd.concat([existing, new], ignore_index=True))
            bar.update(len(part))
        bar.close()
        return pd.DataFrame.from_records(records)

    # -- dataset I/O --------------------------------------------------------------------------
    def _load_existing(self, path: Path | None) -> pd.DataFrame:
        import pandas as pd

        if path is None or not path.exists():
            return pd.DataFrame()
        rows = self._read_dataset(path)
        meta = _read_meta(path)
        if meta.get("model_fingerprint") != self.spec_.fingerprint:
            raise TableMismatchError(
                f"{path} holds plans of another model (fingerprint "
                f"{meta.get('model_fingerprint')}, this is {self.spec_.fingerprint}); pass "
                "another data_path= or delete the file"
            )
        self._check_dataset(rows)
        return rows.drop(columns=[c for c in rows.columns if c not in _BASE_COLUMNS])

    @staticmethod
    def _read_dataset(path: str | Path) -> pd.DataFrame:
        import pandas as pd

        path = Path(path)
        try:
            # exact float round trip (pandas >= 3 does it by default and deprecates the option)
            extra = {} if int(pd.__version__.split(".")[0]) >= 3 else {
                "float_precision": "round_trip"}
            return pd.read_csv(path, **extra)
        except FileNotFoundError:
            raise CorruptFileError(f"{path}: file not found") from None
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise CorruptFileError(f"{path}: not a predictor dataset CSV ({e})") from None

    @staticmethod
    def _check_dataset(rows: pd.DataFrame) -> None:
        missing = [c for c in ("plan_json", "measured_ms") if c not in rows.columns]
        if missing:
            raise CorruptFileError(
                f"predictor dataset lacks columns {missing}; it needs plan_json and "
                "measured_ms (ref_ms optional)"
            )
        bad = rows["measured_ms"].isna() | (rows["measured_ms"] <= 0)
        if bad.any():
            raise CorruptFileError(
                f"predictor dataset has {int(bad.sum())} rows with a missing or non-positive "
                f"measured_ms (first at row {int(np.flatnonzero(bad.to_numpy())[0])})"
            )

    def _save_rows(self, rows: pd.DataFrame) -> None:
        """Checkpoint the measured rows (so a killed fit resumes)."""
        if self.data_path_ is not None:
            self._write(self.data_path_, rows)

    def _write(self, path: Path, rows: pd.DataFrame) -> None:
        from autoprune.io import atomic_write_json, atomic_write_text

        atomic_write_text(path, rows.to_csv(index=False, float_format=None))
        device = getattr(self.table_, "device", None)
        meta = {
            "schema_version": DATASET_SCHEMA_VERSION,
            "model_name": self.spec_.model_name,
            "model_fingerprint": self.spec_.fingerprint,
            "params": self.get_params(),
            "regressor_selected": getattr(self, "regressor_", None),
            "feature_names": self.feature_names_,
            "device": device.to_dict() if hasattr(device, "to_dict") else None,
            "table_alignment": self.alignment_,
            "spec": self.spec_.to_dict(),
        }
        atomic_write_json(_meta_path(path), meta)

    def save(self, path: str | Path) -> Path:
        """Write the measured dataset (CSV) and a JSON sidecar (``<path>.json``) from which
        :meth:`load` rebuilds this predictor exactly. Returns the CSV path."""
        self._check_fitted()
        path = Path(path)
        self._write(path, self.dataset_)
        return path

    @classmethod
    def load(cls, path: str | Path, table: Any = None) -> LatencyPredictor:
        """Rebuild a predictor from a dataset written by :meth:`save` or :meth:`fit`: the same
        parameters refit on the stored features and split, so predictions are identical.

        ``table``: the latency table it was fitted with (default: the table stored in the CSV's
        directory, ``LatencyTable.load(directory)``). A table whose numbers changed since is
        refused with ``TableMismatchError``.
        """
        path = Path(path)
        meta = _read_meta(path)
        if meta.get("schema_version") != DATASET_SCHEMA_VERSION:
            raise CorruptFileError(
                f"{_meta_path(path)}: schema_version {meta.get('schema_version')!r} is not "
                f"supported (expected {DATASET_SCHEMA_VERSION})"
            )
        try:
            spec = ModelSpec.from_dict(meta["spec"])
            params = dict(meta["params"])
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptFileError(f"{_meta_path(path)}: malformed sidecar ({e})") from None
        if "align_to_table" in params:  # written by an early development version
            params["aligned_share"] = 0.5 if params.pop("align_to_table") else 0.0
        import inspect

        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise CorruptFileError(
                f"{_meta_path(path)}: unknown predictor parameters {unknown}; it was written by "
                "another autoprune version: refit with LatencyPredictor().fit(dataset=...)"
            )
        if params.get("structures") is not None:
            params["structures"] = tuple(params["structures"])
        if table is None:
            from autoprune.latency._table import LatencyTable

            table = LatencyTable.load(path.parent)
        rows = cls._read_dataset(path)
        cls._check_dataset(rows)
        est = cls(**params)
        est._check_params()
        est._setup(spec, table)
        est.data_path_ = path
        stored = [c for c in est.feature_names_ if c in rows.columns]
        if stored and len(stored) == len(est.feature_names_):
            fresh = est._plan_features(rows)
            a, b = rows[stored].to_numpy(float), fresh[stored].to_numpy(float)
            if not np.allclose(a, b, rtol=1e-9, atol=1e-12, equal_nan=True):
                worst = int(np.argmax(np.abs(a - b).max(axis=1)))
                raise TableMismatchError(
                    f"the latency table gives other numbers than when {path} was fitted "
                    f"(first differing plan at row {worst}); refit the predictor on this table"
                )
        est._fit_rows(rows, recompute_features=False)
        est.fit_seconds_ = 0.0
        return est

    # -- fitting on rows ----------------------------------------------------------------------
    def _plan_features(self, rows: pd.DataFrame) -> pd.DataFrame:
        plans = [PruningPlan.from_json(s) for s in rows["plan_json"]]
        return self.features(plans)

    def _fit_rows(self, rows: pd.DataFrame, recompute_features: bool = True) -> None:
        import pandas as pd

        rows = rows.reset_index(drop=True)
        rows = rows.drop(columns=[c for c in rows.columns if c not in _BASE_COLUMNS
                                  and c not in self.feature_names_])
        if recompute_features or any(c not in rows.columns for c in self.feature_names_):
            feats = self._plan_features(rows)
            rows = pd.concat([rows.drop(columns=[c for c in self.feature_names_
                                                 if c in rows.columns]), feats], axis=1)
        # paired target: measured / dense-in-same-chunk x median dense
        own, ref = ("measured_ms", "ref_ms") if self.statistic == "median" \
            else ("min_ms", "ref_min_ms")
        paired = self.paired and "ref_ms" in rows.columns and rows["ref_ms"].notna().all()
        for c in ((own, ref) if paired else (own,)) if self.statistic == "min" else ():
            if c not in rows.columns or rows[c].isna().any() or (rows[c] <= 0).any():
                raise CorruptFileError(
                    f"statistic='min' needs a positive {c} on every row; this dataset lacks it "
                    "(measured before minimums were recorded?): use statistic='median'"
                )
        if paired:
            dense_ms = float(np.median(rows.groupby("chunk")[ref].first())) \
                if "chunk" in rows.columns else float(np.median(rows[ref]))
            rows["latency_ms"] = rows[own] / rows[ref] * dense_ms
        else:
            dense_ms = float("nan")
            rows["latency_ms"] = rows[own]
        self.dense_ms_ = dense_ms
        if "split" not in rows.columns or rows["split"].isna().any():
            rows["split"] = self._split(len(rows), rows.get("split"))
        train = rows["split"].to_numpy() == "train"
        hold = ~train
        if train.sum() < 5 or hold.sum() < 3:
            raise InvalidInputError(
                f"too few measured plans to fit and report ({int(train.sum())} train, "
                f"{int(hold.sum())} held out); raise n_samples (now {self.n_samples})"
            )
        x = rows[self.feature_names_].to_numpy(float)
        y = rows["latency_ms"].to_numpy(float)
        name, cv = self._choose(x[train], y[train])
        self.cv_scores_ = cv
        self.regressor_ = name
        self.model_ = self._make(name).fit(x[train], y[train])
        # FLOPs-linear baseline (weighted for relative error), fitted on the same plans
        macs = rows["macs_m"].to_numpy(float)
        a = np.vstack([macs[train], np.ones(train.sum())]).T
        w = 1.0 / y[train]
        coef, *_ = np.linalg.lstsq(a * w[:, None], y[train] * w, rcond=None)
        self.flops_coef_ = (float(coef[0]), float(coef[1]))
        pred = self.model_.predict(x)
        rows["predicted_ms"] = pred
        report = {
            "predictor": accuracy_metrics(y[hold], pred[hold]),
            "table_sum": accuracy_metrics(y[hold], rows["table_ms"].to_numpy(float)[hold]),
            "flops_linear": accuracy_metrics(y[hold], coef[0] * macs[hold] + coef[1]),
        }
        self.report_ = pd.DataFrame.from_dict(report, orient="index")[list(_REPORT_COLUMNS)]
        self.report_.index.name = "method"
        self.report_.attrs["regressor"] = name
        self.report_.attrs["n_train"] = int(train.sum())
        self.dataset_ = rows
        self.n_measured_ = len(rows)
        self.holdout_errors_ = pd.Series(
            (pred[hold] - y[hold]) / y[hold], index=np.flatnonzero(hold), name="rel_error")

    def _split(self, n: int, existing: Any) -> np.ndarray:
        """Keep existing labels; of the unlabelled rows, exactly round(holdout x count) are
        held out, chosen by a seeded permutation (a reload splits the same way). The dense
        plan (row 0) always trains."""
        out = np.full(n, "", dtype=object)
        if existing is not None:
            ex = existing.to_numpy()
            keep = np.array([isinstance(v, str) and v in ("train", "holdout") for v in ex])
            out[keep] = ex[keep]
        free = np.flatnonzero(out == "")
        if len(free) and free[0] == 0:
            out[0] = "train"
            free = free[1:]
        rng = np.random.default_rng(self.random_state + 7919)
        n_hold = int(round(float(self.holdout) * len(free)))
        order = rng.permutation(free)
        out[order[:n_hold]] = "holdout"
        out[order[n_hold:]] = "train"
        return out

    def _make(self, name: str) -> Any:
        if name == "linear":
            return _LinearModel()
        if name == "boosted":
            return _BoostedModel(self.random_state)
        return _RatioGBR(self.random_state, self.feature_names_.index("table_ms"))

    def _choose(self, x: np.ndarray, y: np.ndarray) -> tuple[str, dict[str, float]]:
        reg = Regressor(self.regressor)
        if reg != Regressor.AUTO:
            return reg.value, {}
        from sklearn.model_selection import KFold

        names = ["linear", "boosted"] + ([] if self.monotone else ["gbr"])
        folds = min(int(self.cv_folds), len(y))
        kf = KFold(n_splits=folds, shuffle=True, random_state=self.random_state)
        scores: dict[str, float] = {}
        for name in names:
            rel = np.empty(len(y))
            for tr, te in kf.split(x):
                m = self._make(name).fit(x[tr], y[tr])
                rel[te] = np.abs(m.predict(x[te]) - y[te]) / y[te]
            # share within 10% first, mean error breaks ties
            scores[name] = float(np.mean(rel <= 0.10) - 0.01 * np.mean(rel))
        best = max(names, key=lambda n: (round(scores[n], 6), -names.index(n)))
        return best, scores

    def _active_loop(self, model: Any, example_inputs: Any, backend: Any, progress: bool) -> None:
        import pandas as pd

        rng = np.random.default_rng(self.random_state + 104729)
        self.active_rounds_ = 0
        per_round = max(4, int(self.chunk_size))
        while (self.report_.loc["predictor", "within_10pct"] < float(self.target_within_10)
               and self.n_measured_ < int(self.max_samples)):
            errs = self.holdout_errors_.abs().sort_values(ascending=False)
            worst = [i for i, e in errs.items() if e > 0.05][: per_round] or list(errs.index[:2])
            budget = min(per_round, int(self.max_samples) - self.n_measured_)
            base = [PruningPlan.from_json(self.dataset_.loc[i, "plan_json"]) for i in worst]
            known = set(self.dataset_["plan_json"])
            new_plans: list[PruningPlan] = []
            for j in range(budget * 3):
                for p in self._neighbours(base[j % len(base)], rng, 1):
                    if _plan_key(p) not in known:
                        known.add(_plan_key(p))
                        new_plans.append(p)
                if len(new_plans) >= budget:
                    break
            if not new_plans:
                break
            base_rows = self.dataset_[[c for c in self.dataset_.columns if c in _BASE_COLUMNS]]
            # held-out plans stay held out; the new ones only train
            new = self._measure(new_plans, model, example_inputs, backend, progress,
                                first_chunk=_next_chunk(base_rows), existing=base_rows,
                                split="train")
            rows = pd.concat([base_rows, new], ignore_index=True)
            self._save_rows(rows)
            self._fit_rows(rows)
            self.active_rounds_ += 1
        if self.data_path_ is not None:
            self._write(self.data_path_, self.dataset_)

    # -- features -----------------------------------------------------------------------------
    def _feature_names(self) -> list[str]:
        mono = [f"table_ms_{k}" for k in self.kinds_]
        mono += ["table_ms_masked", "table_ms_sq", "table_ms_sqrt", "macs_m", "params_m", "act_m",
                 "n_layers"]
        if self.monotone:
            return ["table_ms", *mono]
        return ["table_ms", *mono, "misaligned_share", "misaligned_table_ms", "blocks_removed"]

    def features(self, plans: Sequence[PruningPlan]) -> pd.DataFrame:
        """Table and graph features of each plan (one row per plan), in ``feature_names_``."""
        import pandas as pd

        if not hasattr(self, "_compiled"):
            self._check_fitted()
        return pd.DataFrame(self._feature_matrix(plans), columns=self.feature_names_)

    def _feature_matrix(self, plans: Sequence[PruningPlan]) -> np.ndarray:
        c = self._compiled
        enc = c.encode(plans)
        cin, cout, lstruct, ldens, present = c.layer_arrays(enc)
        n_p, n_l = cin.shape
        lat = np.zeros((n_p, n_l))
        macs = np.zeros((n_p, n_l))
        params = np.zeros((n_p, n_l))
        act = np.zeros((n_p, n_l))
        for j in range(n_l):
            vals = self._layer_values(j, cin[:, j], cout[:, j], lstruct[:, j], ldens[:, j])
            lat[:, j], macs[:, j], params[:, j], act[:, j] = vals
        pm = present.astype(float)
        lat *= pm
        cols: list[np.ndarray] = [lat.sum(axis=1)]
        ops = np.array([op.value for op in c.ops])
        for k in self.kinds_:
            cols.append(lat[:, ops == k].sum(axis=1))
        cols.append((lat * (lstruct >= 2)).sum(axis=1))
        cols.append(cols[0] ** 2)  # convex and concave terms of the table sum (both monotone)
        cols.append(np.sqrt(cols[0]))
        cols.append((macs * pm).sum(axis=1) / 1e6)
        cols.append((params * pm).sum(axis=1) / 1e6)
        cols.append((act * pm).sum(axis=1) / 1e6)
        cols.append(pm.sum(axis=1))
        if not self.monotone:
            mis = ((cout % self.alignment_) != 0) & present
            cols.append(mis.sum(axis=1) / np.maximum(1, present.sum(axis=1)))
            cols.append((lat * mis).sum(axis=1))
            cols.append(enc.removed.sum(axis=1).astype(float))
        return np.stack(cols, axis=1)

    def _layer_values(
        self, j: int, cin: np.ndarray, cout: np.ndarray, st: np.ndarray, dens: np.ndarray
    ) -> tuple[np.ndarray, ...]:
        """Table latency, MACs, params and activation elements of layer ``j`` for each plan;
        each distinct (widths, structure, density) is looked up once and cached. A mask
        structure the table's device does not accelerate is priced as dense (what the table's
        own lookup does), so its densities do not multiply the distinct keys."""
        st = np.where(self._accelerated[st], st, 0)
        if np.all(st == 0):
            code = (cin.astype(np.int64) << 32) | cout.astype(np.int64)
            uniq, inv = np.unique(code, return_inverse=True)
            keys = [(j, int(u >> 32), int(u & 0xFFFFFFFF), 0, 1.0) for u in uniq]
        else:
            raw = list(zip(cin.tolist(), cout.tolist(), st.tolist(), dens.tolist()))
            index: dict[tuple[Any, ...], int] = {}
            inv = np.empty(len(raw), dtype=np.int64)
            keys = []
            for i, (a, b, s, d) in enumerate(raw):
                k = (j, a, b, s, d if s else 1.0)
                pos = index.get(k)
                if pos is None:
                    pos = index[k] = len(keys)
                    keys.append(k)
                inv[i] = pos
        vals = np.array([self._lookup(k) for k in keys], dtype=float).reshape(len(keys), 4)
        out = vals[inv]
        return out[:, 0], out[:, 1], out[:, 2], out[:, 3]

    def _lookup(self, key: tuple[int, int, int, int, float]) -> tuple[float, ...]:
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        j, cin, cout, code, density = key
        spec = self._compiled.layer_specs[j].with_channels(cin, cout)
        structure = _CODE_STRUCT[code]
        ms = float(self.table_.lookup(spec, structure, density, policy=self.miss_policy))
        val = (ms, float(spec.macs), float(spec.params), float(spec.activation_elems))
        self._cache[key] = val
        return val

    # -- predict ------------------------------------------------------------------------------
    def predict_many(self, plans: Sequence[PruningPlan]) -> np.ndarray:
        """Predicted latency (ms) of each plan, as one array. Vectorised; see module doc."""
        self._check_fitted()
        if len(plans) == 0:
            return np.zeros(0)
        return self.model_.predict(self._feature_matrix(plans))

    def predict(self, plan: PruningPlan) -> float:
        """Predicted end-to-end latency of ``plan`` in milliseconds."""
        return float(self.predict_many([plan])[0])

    def table_sum_ms(self, plans: Sequence[PruningPlan]) -> np.ndarray:
        """The plain table part (sum of per-layer table latencies) of each plan."""
        if not hasattr(self, "_compiled"):
            self._check_fitted()
        return self._feature_matrix(plans)[:, 0]

    def __repr__(self) -> str:
        if not hasattr(self, "model_"):
            return f"LatencyPredictor(regressor={self.regressor!r}, unfitted)"
        r = self.report_.loc["predictor"]
        return (
            f"LatencyPredictor({self.spec_.model_name}, {self.regressor_}: "
            f"{100 * r['within_10pct']:.0f}% of {int(r['n_holdout'])} held-out plans within "
            f"±10%, MAPE {100 * r['mape']:.1f}%)"
        )


_BASE_COLUMNS = ("plan_json", "measured_ms", "iqr_ms", "n_runs", "min_ms", "ref_ms", "ref_iqr_ms",
                 "ref_min_ms", "chunk",
                 "measure_seconds", "prepare_seconds", "split")


def _next_chunk(rows: pd.DataFrame) -> int:
    if not len(rows) or "chunk" not in rows.columns or rows["chunk"].isna().all():
        return 0
    return int(rows["chunk"].max()) + 1


def _plan_key(plan: PruningPlan) -> str:
    return plan.to_json(indent=None)


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _read_meta(path: Path) -> dict[str, Any]:
    from autoprune.io import read_json

    meta = read_json(_meta_path(path))
    if not isinstance(meta, dict):
        raise CorruptFileError(f"{_meta_path(path)}: expected a JSON object")
    return meta


def _apply(apply_plan: Any, model: Any, plan: PruningPlan, example_inputs: Any,
           spec: ModelSpec) -> Any:
    try:
        return apply_plan(model, plan, example_inputs, spec=spec)
    except TypeError as e:  # an executor without the spec= shortcut
        if "spec" not in str(e):
            raise
        return apply_plan(model, plan, example_inputs)


__all__ = ["LatencyPredictor", "Regressor", "accuracy_metrics", "DATASET_SCHEMA_VERSION"]
