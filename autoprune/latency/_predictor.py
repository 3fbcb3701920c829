"""``LatencyPredictor``: whole-network latency of a plan, from the table and measured plans.

The search scores thousands of plans; it cannot measure each one. The prediction has two parts:

* the **table part** (``_featurize``): per-layer latencies from a ``LatencyTable`` at the plan's
  widths and structures, priced by the device's kernel rules (a width off a fast kernel path
  costs that path's measured penalty), summed per op kind, plus graph features (MACs,
  parameters as weight traffic, activation elements, layer count) and regime features (time
  in slow kernel paths, activations re-laid-out around them);
* the **correction part** (``_regressors``): a scikit-learn regressor fitted on whole-model
  latencies measured on the device (``_campaign``) for plans of every kind the model will be
  asked about (``_sampler``: search-space plans, uniform aligned, uniform unaligned, random
  unaligned), stored as a dataset (``_dataset``).

Every valid plan gets a prediction: the table never raises for a profiled model (stated
interpolation rules), predictions are floored at ``MIN_TABLE_SHARE`` of the table sum (never
≤ 0), and ``predict_interval`` gives a band from out-of-fold errors on the training plans.
``report_`` (``_report``) scores held-out plans for the predictor, the plain table sum and a
FLOPs-linear model; ``report_by_kind_`` breaks it down by plan kind.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from autoprune.errors import (
    CorruptFileError,
    InvalidInputError,
    NotFittedError,
    TableMismatchError,
)
from autoprune.latency._campaign import estimate_seconds, measure_plans
from autoprune.latency._dataset import (
    BASE_COLUMNS,
    DATASET_SCHEMA_VERSION,
    READABLE_VERSIONS,
    base_rows,
    check_dataset,
    meta_path,
    next_chunk,
    plan_key,
    read_dataset,
    read_meta,
    write_dataset,
)
from autoprune.latency._featurize import FEATURES_VERSION, PlanFeaturizer
from autoprune.latency._regressors import Regressor, make_regressor
from autoprune.latency._report import REPORT_COLUMNS, accuracy_metrics, interval_coverage
from autoprune.latency._sampler import PlanSampler
from autoprune.plan import PruningPlan
from autoprune.types import ModelSpec, Structure

if TYPE_CHECKING:
    import pandas as pd

RegressorName = Literal["auto", "linear", "boosted", "gbr"]
Statistic = Literal["median", "min"]
MissPolicy = Literal["raise", "measure", "interpolate"]
#: a prediction is never below this share of the plan's table sum (so never <= 0)
MIN_TABLE_SHARE = 0.2


class LatencyPredictor:
    """Predict a pruned model's end-to-end latency (ms) on one device from a plan.

    Parameters (stored as given; checked in :meth:`fit`):

    regressor: ``"auto"`` (cross-validated choice among the allowed ones), ``"linear"``,
        ``"boosted"`` or ``"gbr"`` (see :class:`Regressor`).
    monotone: allow only regressors monotone in every feature (``linear``, ``boosted``);
        ``regressor="gbr"`` with ``monotone=True`` is an error. (The table part itself is not
        monotone in width on devices with kernel rules, by design: there an unaligned width
        really is slower than the next aligned one.)
    holdout: share of measured plans kept out of fitting for ``report_``.
    n_samples: plans to measure (the dense model included), before active sampling.
    miss_policy: passed to ``LatencyTable.lookup`` for widths the table has not measured
        ("interpolate" prices every width of a profiled model by stated rules; "measure"
        times each new width as a micro-model on the fit backend).
    random_state: seed for plan sampling, the split and the regressors.
    active: after the first fit, measure more plans near the held-out plans with the largest
        error until ``target_within_10`` of held-out plans are within ±10% or ``max_samples``
        plans are measured. Held-out plans themselves are never used for fitting.
    paired: time every chunk of plans interleaved with the dense model and fit on
        ``measured / dense-in-same-chunk x median dense`` (cancels drift; DESIGN §5).
    statistic: ``"median"`` (default) or ``"min"`` of each measurement (both are stored).
    structures, min_keep_ratio, block_probability, aligned_share: the sampled plans (see
        ``autoprune.latency._sampler.PlanSampler``); ``aligned_share`` of them snap to the
        table's alignment, the rest are the unaligned plans other toolkits produce.
    interval: coverage of ``predict_interval``'s band (from out-of-fold errors).
    cv_folds: folds for ``regressor="auto"`` and the interval. chunk_size: plans per
        interleaved measurement.

    Fitted attributes: ``spec_``, ``table_``, ``dataset_`` (DataFrame), ``report_``
    (DataFrame, rows ``predictor`` / ``table_sum`` / ``flops_linear``, columns
    ``within_5pct``, ``within_10pct``, ``mape`` (fractions), ``spearman``, ``n_holdout``,
    held-out plans only; ``attrs["interval_coverage"]``), ``report_by_kind_``,
    ``regressor_``, ``cv_scores_``, ``feature_names_``, ``interval_ratio_`` (low, high
    multipliers of a prediction), ``dense_ms_``, ``fit_seconds_``, ``n_measured_``,
    ``data_path_``, ``estimated_seconds_``.
    """

    def __init__(
        self,
        regressor: RegressorName | Regressor = "auto",
        *,
        monotone: bool = True,
        holdout: float = 0.25,
        n_samples: int = 48,
        miss_policy: MissPolicy = "interpolate",
        random_state: int = 0,
        active: bool = False,
        target_within_10: float = 0.95,
        max_samples: int = 160,
        paired: bool = True,
        statistic: Statistic = "median",
        structures: tuple[Structure | str, ...] | None = None,
        min_keep_ratio: float = 0.1,
        block_probability: float = 0.15,
        aligned_share: float = 0.6,
        interval: float = 0.9,
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
        self.interval = interval
        self.cv_folds = cv_folds
        self.chunk_size = chunk_size

    # -- parameters -----------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        params = {name: getattr(self, name) for name in _param_names()}
        params["regressor"] = str(Regressor(self.regressor)) \
            if isinstance(self.regressor, Regressor) else self.regressor
        params["structures"] = None if self.structures is None \
            else [Structure(s).value for s in self.structures]
        return params

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
                "regressor 'gbr' is not monotone; pass monotone=False to use it, or "
                "regressor='boosted' for a monotone flexible model"
            )
        checks = [
            (0.0 < float(self.holdout) < 1.0, f"holdout must be in (0, 1), got {self.holdout!r}"),
            (int(self.n_samples) >= 10, f"n_samples must be >= 10, got {self.n_samples!r}"),
            (self.miss_policy in ("raise", "measure", "interpolate"),
             f"miss_policy must be 'raise', 'measure' or 'interpolate', got "
             f"{self.miss_policy!r}"),
            (0.0 < float(self.target_within_10) <= 1.0,
             f"target_within_10 must be in (0, 1], got {self.target_within_10!r}"),
            (not self.active or int(self.max_samples) >= int(self.n_samples),
             f"max_samples ({self.max_samples}) must be >= n_samples ({self.n_samples})"),
            (0.0 < float(self.min_keep_ratio) <= 1.0,
             f"min_keep_ratio must be in (0, 1], got {self.min_keep_ratio!r}"),
            (int(self.cv_folds) >= 2, f"cv_folds must be >= 2, got {self.cv_folds!r}"),
            (self.statistic in ("median", "min"),
             f"statistic must be 'median' or 'min', got {self.statistic!r}"),
            (0.0 <= float(self.aligned_share) <= 1.0,
             f"aligned_share must be in [0, 1], got {self.aligned_share!r}"),
            (0.0 < float(self.interval) < 1.0,
             f"interval must be in (0, 1), got {self.interval!r}"),
            (int(self.chunk_size) >= 1, f"chunk_size must be >= 1, got {self.chunk_size!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidInputError(message)

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
        """Measure sampled plans on ``backend`` (or take ``dataset``), fit the correction on
        part of them and report accuracy on the rest. Returns ``self``.

        ``table``: the model's latency table (``autoprune.profile``). ``spec``: the model's
        ``ModelSpec`` (analysed from ``model`` if None). ``dataset``: measured plans (DataFrame
        or CSV written by ``save``) to fit on instead of measuring. ``data_path``: CSV to keep
        the measured plans in (default: beside the table, if the table has a directory; an
        existing file there for the same model is resumed, only missing plans are measured).
        Before measuring, a rough estimate of the campaign's time is printed (``progress``)
        and kept in ``estimated_seconds_``.
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
            from autoprune._analyze import analyze

            spec = analyze(model, example_inputs)
        self._setup(spec, table, backend)
        if data_path is None:
            data_path = self._default_data_path(table)
        self.data_path_ = Path(data_path) if data_path is not None else None
        self.estimated_seconds_ = 0.0

        rows: pd.DataFrame
        if dataset is not None:
            rows = read_dataset(dataset) if not isinstance(dataset, pd.DataFrame) \
                else dataset.copy()
            if "kind" not in rows.columns:
                rows["kind"] = "unknown"
            check_dataset(rows)
        else:
            if model is None or example_inputs is None or backend is None:
                raise InvalidInputError(
                    "fit needs model=, example_inputs= and backend= to measure plans (or "
                    "dataset= with measured plans)"
                )
            rows = self._load_existing(self.data_path_)
            rng = np.random.default_rng(self.random_state)
            sampled = self._sampler().sample(rng, int(self.n_samples))
            done = set(rows["plan_json"]) if len(rows) else set()
            todo = [(k, p) for k, p in sampled if plan_key(p) not in done][: max(
                0, int(self.n_samples) - len(rows))]
            if todo:
                self.estimated_seconds_ = estimate_seconds(len(todo), int(self.chunk_size),
                                                           backend)
                if progress:
                    from tqdm.auto import tqdm

                    tqdm.write(f"[autoprune] fitting the latency predictor of "
                               f"{spec.model_name}: {len(todo)} plans to measure on "
                               f"{getattr(backend, 'name', 'the backend')}, about "
                               f"{self.estimated_seconds_:.0f} s (the progress bar refines it)")
                new = self._campaign(todo, model, example_inputs, backend, progress,
                                     first_chunk=next_chunk(rows), existing=rows)
                rows = pd.concat([rows, new], ignore_index=True) if len(rows) else new
                self._save_rows(rows)
        self._fit_rows(rows)
        if self.active and dataset is None:
            self._active_loop(model, example_inputs, backend, progress)
        if self.data_path_ is not None:  # the fitted state: features, split, chosen regressor
            self._write(self.data_path_, self.dataset_)
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _setup(self, spec: ModelSpec, table: Any, backend: Any = None) -> None:
        self.spec_ = spec
        self.table_ = table
        self._featurizer = PlanFeaturizer(spec, table, self.miss_policy, backend=backend,
                                          free=not self.monotone)
        self.kinds_ = self._featurizer.kinds
        self.alignment_ = self._featurizer.alignment
        self.feature_names_ = self._featurizer.names
        dense = self.features([PruningPlan.dense(spec)])
        self.dense_table_ms_ = float(dense["table_ms"].iloc[0])
        self.dense_macs_ = float(dense["macs_m"].iloc[0])

    def _sampler(self) -> PlanSampler:
        return PlanSampler(self.spec_, self.alignment_, aligned_share=float(self.aligned_share),
                           min_keep_ratio=float(self.min_keep_ratio),
                           block_probability=float(self.block_probability),
                           structures=self.structures,
                           group_step=int(getattr(self._featurizer.rules, "group_step", 1) or 1))

    def _default_data_path(self, table: Any) -> Path | None:
        d = getattr(table, "path", None)
        if not d:
            return None
        d = Path(d)
        return d / f"predictor_{self.spec_.model_name}_{self.spec_.fingerprint}.csv"

    def _campaign(self, todo: list[tuple[str, PruningPlan]], model: Any, example_inputs: Any,
                  backend: Any, progress: bool, first_chunk: int,
                  existing: pd.DataFrame | None, split: str | None = None) -> pd.DataFrame:
        import pandas as pd

        def checkpoint(new: pd.DataFrame) -> None:
            self._save_rows(new if existing is None or not len(existing)
                            else pd.concat([existing, new], ignore_index=True))

        return measure_plans([p for _, p in todo], [k for k, _ in todo], model,
                             example_inputs, backend, self.spec_,
                             chunk_size=int(self.chunk_size), paired=bool(self.paired),
                             first_chunk=first_chunk, split=split, on_chunk=checkpoint,
                             progress=progress)

    # -- dataset I/O --------------------------------------------------------------------------
    def _load_existing(self, path: Path | None) -> pd.DataFrame:
        import pandas as pd

        if path is None or not path.exists():
            return pd.DataFrame()
        rows = read_dataset(path)
        meta = read_meta(path)
        if meta.get("model_fingerprint") != self.spec_.fingerprint:
            raise TableMismatchError(
                f"{path} holds plans of another model (fingerprint "
                f"{meta.get('model_fingerprint')}, this is {self.spec_.fingerprint}); pass "
                "another data_path= or delete the file"
            )
        check_dataset(rows)
        return base_rows(rows)

    def _save_rows(self, rows: pd.DataFrame) -> None:
        """Checkpoint the measured rows (so a killed fit resumes)."""
        if self.data_path_ is not None:
            self._write(self.data_path_, rows)

    def _write(self, path: Path, rows: pd.DataFrame) -> None:
        device = getattr(self.table_, "device", None)
        write_dataset(path, rows, {
            "model_name": self.spec_.model_name,
            "model_fingerprint": self.spec_.fingerprint,
            "params": self.get_params(),
            "regressor_selected": getattr(self, "regressor_", None),
            "feature_names": self.feature_names_,
            "features_version": FEATURES_VERSION,
            "device": device.to_dict() if device is not None and hasattr(device, "to_dict")
            else None,
            "table_alignment": self.alignment_,
            "spec": self.spec_.to_dict(),
        })

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
        meta = read_meta(path)
        if meta.get("schema_version") not in READABLE_VERSIONS:
            raise CorruptFileError(
                f"{meta_path(path)}: schema_version {meta.get('schema_version')!r} is not "
                f"supported (expected one of {READABLE_VERSIONS})"
            )
        try:
            spec = ModelSpec.from_dict(meta["spec"])
            params = dict(meta["params"])
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptFileError(f"{meta_path(path)}: malformed sidecar ({e})") from None
        unknown = sorted(set(params) - set(_param_names()))
        if unknown:
            raise CorruptFileError(
                f"{meta_path(path)}: unknown predictor parameters {unknown}; it was written by "
                "another autoprune version: refit with LatencyPredictor().fit(dataset=...)"
            )
        if params.get("structures") is not None:
            params["structures"] = tuple(params["structures"])
        if table is None:
            from autoprune.latency._table import LatencyTable

            table = LatencyTable.load(path.parent)
        rows = read_dataset(path)
        check_dataset(rows)
        est = cls(**params)
        est._check_params()
        est._setup(spec, table)
        est.data_path_ = path
        stored = [c for c in est.feature_names_ if c in rows.columns]
        outdated = meta.get("features_version", 1) != FEATURES_VERSION
        if outdated:
            warnings.warn(
                f"{path}: its features were computed by an earlier definition (features "
                f"version {meta.get('features_version', 1)}, now {FEATURES_VERSION}); refitted "
                "on features computed now from the same measured plans, so predictions differ "
                "from the saved fit", stacklevel=2)
        elif stored and len(stored) == len(est.feature_names_):
            fresh = est._plan_features(rows)
            a, b = rows[stored].to_numpy(float), fresh[stored].to_numpy(float)
            if not np.allclose(a, b, rtol=1e-9, atol=1e-12, equal_nan=True):
                worst = int(np.argmax(np.abs(a - b).max(axis=1)))
                raise TableMismatchError(
                    f"the latency table gives other numbers than when {path} was fitted "
                    f"(first differing plan at row {worst}); refit the predictor on this table"
                )
        est._fit_rows(rows, recompute_features=outdated)
        est.fit_seconds_ = 0.0
        return est

    # -- fitting on rows ----------------------------------------------------------------------
    def _plan_features(self, rows: pd.DataFrame) -> pd.DataFrame:
        plans = [PruningPlan.from_json(s) for s in rows["plan_json"]]
        return self.features(plans)

    def _targets(self, rows: pd.DataFrame) -> tuple[np.ndarray, float]:
        """Latency to fit on (paired: measured / dense-in-same-chunk × median dense)."""
        own, ref = ("measured_ms", "ref_ms") if self.statistic == "median" \
            else ("min_ms", "ref_min_ms")
        paired = self.paired and "ref_ms" in rows.columns and rows["ref_ms"].notna().all()
        if self.statistic == "min":
            for c in (own, ref) if paired else (own,):
                if c not in rows.columns or rows[c].isna().any() or (rows[c] <= 0).any():
                    raise CorruptFileError(
                        f"statistic='min' needs a positive {c} on every row; this dataset "
                        "lacks it (measured before minimums were recorded?): use "
                        "statistic='median'"
                    )
        if not paired:
            return rows[own].to_numpy(float), float("nan")
        dense_ms = float(np.median(rows.groupby("chunk")[ref].first())) \
            if "chunk" in rows.columns else float(np.median(rows[ref]))
        return (rows[own] / rows[ref] * dense_ms).to_numpy(float), dense_ms

    def _fit_rows(self, rows: pd.DataFrame, recompute_features: bool = True) -> None:
        import pandas as pd

        rows = rows.reset_index(drop=True)
        rows = rows.drop(columns=[c for c in rows.columns if c not in BASE_COLUMNS
                                  and c not in self.feature_names_])
        if "kind" not in rows.columns:
            rows["kind"] = "unknown"
        if recompute_features or any(c not in rows.columns for c in self.feature_names_):
            feats = self._plan_features(rows)
            rows = pd.concat([rows.drop(columns=[c for c in self.feature_names_
                                                 if c in rows.columns]), feats], axis=1)
        y, self.dense_ms_ = self._targets(rows)
        rows["latency_ms"] = y
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
        anchor = (rows["kind"].astype(str).to_numpy() == "dense")[train]
        name, cv, oof = self._choose(x[train], y[train], anchor)
        self.cv_scores_ = cv
        self.regressor_ = name
        self.model_ = self._make(name).fit(x[train], y[train])
        # the band: quantiles of measured / predicted over out-of-fold training predictions
        # (the dense plan, in every fold's training part, has no out-of-fold prediction)
        ratio = y[train][~anchor] / np.maximum(oof[~anchor], 1e-12)
        tail = (1.0 - float(self.interval)) / 2
        self.interval_ratio_ = (float(np.quantile(ratio, tail)),
                                float(np.quantile(ratio, 1 - tail)))
        # FLOPs-linear baseline (weighted for relative error), fitted on the same plans
        macs = rows["macs_m"].to_numpy(float)
        a = np.vstack([macs[train], np.ones(train.sum())]).T
        w = 1.0 / y[train]
        coef, *_ = np.linalg.lstsq(a * w[:, None], y[train] * w, rcond=None)
        self.flops_coef_ = (float(coef[0]), float(coef[1]))
        pred = self._floored(self.model_.predict(x), x)
        rows["predicted_ms"] = pred
        methods = {
            "predictor": pred,
            "table_sum": rows["table_ms"].to_numpy(float),
            "flops_linear": coef[0] * macs + coef[1],
        }
        report = {m: accuracy_metrics(y[hold], p[hold]) for m, p in methods.items()}
        self.report_ = pd.DataFrame.from_dict(report, orient="index")[list(REPORT_COLUMNS)]
        self.report_.index.name = "method"
        self.report_.attrs["regressor"] = name
        self.report_.attrs["n_train"] = int(train.sum())
        lo, hi = self.interval_ratio_
        self.report_.attrs["interval_coverage"] = interval_coverage(
            y[hold], pred[hold] * lo, pred[hold] * hi)
        self.report_by_kind_ = _by_kind(rows["kind"].to_numpy()[hold], y[hold],
                                        {m: p[hold] for m, p in methods.items()})
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
        return make_regressor(name, self.random_state, self.feature_names_.index("table_ms"))

    def _choose(self, x: np.ndarray, y: np.ndarray, anchor: np.ndarray
                ) -> tuple[str, dict[str, float], np.ndarray]:
        """(regressor name, CV score per candidate, out-of-fold predictions of the chosen).

        ``anchor`` rows (the dense plan) are in every fold's training part, as in every real
        fit: the dense model reads the most weights of any plan, so a fold without it would
        score extrapolations along the weight features that no prediction makes (on the Zen 5
        VM's quickstart the dense plan left out was predicted 8x its latency, and the band's
        low end fell to 0.18x the prediction). Their out-of-fold entries are NaN."""
        from sklearn.model_selection import KFold

        reg = Regressor(self.regressor)
        if reg != Regressor.AUTO:
            names = [reg.value]
        else:
            names = ["linear", "boosted"] + ([] if self.monotone else ["gbr"])
        rest = np.flatnonzero(~anchor)
        fixed = np.flatnonzero(anchor)
        folds = min(int(self.cv_folds), len(rest))
        kf = KFold(n_splits=folds, shuffle=True, random_state=self.random_state)
        scores: dict[str, float] = {}
        oof: dict[str, np.ndarray] = {}
        for name in names:
            pred = np.full(len(y), np.nan)
            for tr, te in kf.split(rest):
                tr, te = np.concatenate([fixed, rest[tr]]), rest[te]
                m = self._make(name).fit(x[tr], y[tr])
                pred[te] = self._floored(m.predict(x[te]), x[te])
            rel = (np.abs(pred - y) / y)[rest]
            # share within 10% first, mean error breaks ties
            scores[name] = float(np.mean(rel <= 0.10) - 0.01 * np.mean(rel))
            oof[name] = pred
        best = max(names, key=lambda n: (round(scores[n], 6), -names.index(n)))
        return best, (scores if reg == Regressor.AUTO else {}), oof[best]

    def _floored(self, pred: np.ndarray, x: np.ndarray) -> np.ndarray:
        return np.asarray(np.maximum(pred, MIN_TABLE_SHARE * x[:, 0]), dtype=float)

    def _active_loop(self, model: Any, example_inputs: Any, backend: Any, progress: bool) -> None:
        import pandas as pd

        rng = np.random.default_rng(self.random_state + 104729)
        sampler = self._sampler()
        self.active_rounds_ = 0
        per_round = max(4, int(self.chunk_size))
        while (self.report_.loc["predictor", "within_10pct"] < float(self.target_within_10)
               and self.n_measured_ < int(self.max_samples)):
            errs = self.holdout_errors_.abs().sort_values(ascending=False)
            worst = [i for i, e in errs.items() if e > 0.05][: per_round] or list(errs.index[:2])
            budget = min(per_round, int(self.max_samples) - self.n_measured_)
            base = [(str(self.dataset_.loc[i, "kind"]),
                     PruningPlan.from_json(self.dataset_.loc[i, "plan_json"])) for i in worst]
            known = set(self.dataset_["plan_json"])
            new_plans: list[tuple[str, PruningPlan]] = []
            for j in range(budget * 3):
                kind, plan = base[j % len(base)]
                for p in sampler.neighbours(plan, rng, 1):
                    if plan_key(p) not in known:
                        known.add(plan_key(p))
                        new_plans.append((kind, p))
                if len(new_plans) >= budget:
                    break
            if not new_plans:
                break
            old = base_rows(self.dataset_)
            # held-out plans stay held out; the new ones only train
            new = self._campaign(new_plans, model, example_inputs, backend, progress,
                                 first_chunk=next_chunk(old), existing=old, split="train")
            rows = pd.concat([old, new], ignore_index=True)
            self._save_rows(rows)
            self._fit_rows(rows)
            self.active_rounds_ += 1

    # -- features and predictions ---------------------------------------------------------------
    def features(self, plans: Sequence[PruningPlan]) -> pd.DataFrame:
        """Table and graph features of each plan (one row per plan), in ``feature_names_``."""
        if not hasattr(self, "_featurizer"):
            self._check_fitted()
        return self._featurizer.frame(plans)

    def predict_many(self, plans: Sequence[PruningPlan]) -> np.ndarray:
        """Predicted latency (ms) of each plan, as one array (vectorised, cached lookups)."""
        self._check_fitted()
        if len(plans) == 0:
            return np.zeros(0)
        x = self._featurizer.matrix(plans)
        return self._floored(self.model_.predict(x), x)

    def predict(self, plan: PruningPlan) -> float:
        """Predicted end-to-end latency of ``plan`` in milliseconds."""
        return float(self.predict_many([plan])[0])

    def predict_interval(self, plans: Sequence[PruningPlan]) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) ms per plan: the prediction times the ``interval`` quantiles of
        measured / predicted seen out of fold on the training plans."""
        p = self.predict_many(plans)
        lo, hi = self.interval_ratio_
        return p * lo, p * hi

    def table_sum_ms(self, plans: Sequence[PruningPlan]) -> np.ndarray:
        """The plain table part (sum of per-layer table latencies) of each plan."""
        if not hasattr(self, "_featurizer"):
            self._check_fitted()
        return self._featurizer.table_sum_ms(plans)

    def __repr__(self) -> str:
        if not hasattr(self, "model_"):
            return f"LatencyPredictor(regressor={self.regressor!r}, unfitted)"
        r = self.report_.loc["predictor"]
        return (
            f"LatencyPredictor({self.spec_.model_name}, {self.regressor_}: "
            f"{100 * r['within_10pct']:.0f}% of {int(r['n_holdout'])} held-out plans within "
            f"±10%, MAPE {100 * r['mape']:.1f}%)"
        )


def _param_names() -> list[str]:
    return [n for n in inspect.signature(LatencyPredictor.__init__).parameters if n != "self"]


def _by_kind(kinds: np.ndarray, y: np.ndarray, methods: dict[str, np.ndarray]) -> pd.DataFrame:
    """Held-out accuracy per (plan kind, method)."""
    import pandas as pd

    out = []
    for kind in sorted(set(kinds.tolist())):
        sel = kinds == kind
        for m, p in methods.items():
            out.append({"kind": kind, "method": m, **accuracy_metrics(y[sel], p[sel])})
    return pd.DataFrame(out).set_index(["kind", "method"]) if out else pd.DataFrame()


__all__ = ["LatencyPredictor", "MIN_TABLE_SHARE", "DATASET_SCHEMA_VERSION"]
