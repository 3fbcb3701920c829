"""The ``LatencyModel`` protocol every latency model satisfies, and the two small ones.

A latency model prices plans: ``predict_many(plans) -> ms`` (one array), ``predict(plan) ->
ms`` and ``predict_interval(plans) -> (low, high)``. ``LatencyPredictor`` (table + learned
correction), ``TableLatencyModel`` (table sums mapped onto measured anchor plans) and
``CallableLatencyModel`` (a user's ``plan -> ms`` function) satisfy it, and the search takes
any of them through ``as_latency_model`` — no attribute probing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from autoprune.errors import InvalidInputError, NotFittedError
from autoprune.latency._featurize import PlanFeaturizer
from autoprune.plan import PruningPlan
from autoprune.types import ModelSpec


@runtime_checkable
class LatencyModel(Protocol):
    """What the search needs from a latency model."""

    def predict_many(self, plans: Sequence[PruningPlan]) -> np.ndarray:
        """Predicted latency (ms) of each plan."""
        ...

    def predict(self, plan: PruningPlan) -> float:
        """Predicted latency (ms) of one plan."""
        ...

    def predict_interval(self, plans: Sequence[PruningPlan]) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) ms per plan: the model's uncertainty band."""
        ...


class TableLatencyModel:
    """Table sums mapped affinely onto whole-model latency measured on the device for a few
    anchor plans (e.g. the dense plan and the space's fastest plan): ``a + b x base``, where
    ``base`` is the table sum plus the plan's weight-streaming cost (``stream_ms``: what the
    whole model pays once its weights outgrow the caches, beyond what each layer's micro-model
    paid; 0 where the table's kernel rules carry no probe). Without that term a straight line
    through the dense plan (resnet18 at 64² reads 44.7 MB of weights per inference, from memory)
    and a small plan (in cache) over-prices every plan between them.

    Cheaper than ``LatencyPredictor`` (a few measurements instead of a sampled dataset) and less
    accurate away from the anchors; ``search(predictor="table")`` uses it. Widths are priced by
    the table's ``miss_policy`` ("interpolate" follows the device's kernel rules and never
    raises for a profiled model; "measure" times each new width on the fit backend). The
    interval is the anchors' own measurement spread (relative IQR), widened by the worst
    leave-one-out error when there are three or more anchors: a floor on the uncertainty, not a
    calibrated band. Fitted attributes: ``intercept_ms_``, ``slope_``, ``anchors_`` (base
    ms, measured ms) pairs, ``rel_spread_``, ``dense_ms_`` (the dense anchor as measured,
    None when no anchor is the dense plan).
    """

    def __init__(self, table: Any, spec: ModelSpec, miss_policy: str = "interpolate") -> None:
        self.table = table
        self.spec = spec
        self.miss_policy = miss_policy

    def _featurizer(self, backend: Any = None) -> PlanFeaturizer:
        if not hasattr(self, "featurizer_") or backend is not None:
            self.featurizer_ = PlanFeaturizer(self.spec, self.table, self.miss_policy,
                                              backend=backend)
        return self.featurizer_

    def table_sum_ms(self, plans: Sequence[PruningPlan]) -> np.ndarray:
        return self._featurizer().table_sum_ms(list(plans))

    def base_ms(self, plans: Sequence[PruningPlan]) -> np.ndarray:
        """What the affine map is applied to: the table sum plus ``stream_ms`` per plan."""
        f = self._featurizer()
        x = f.matrix(list(plans))
        return np.asarray(x[:, 0] + x[:, f.names.index("stream_ms")], dtype=float)

    def fit(self, model: Any, example_inputs: Any, backend: Any,
            plans: Sequence[PruningPlan]) -> TableLatencyModel:
        """Measure ``plans`` (at least two, of different table sums) interleaved on
        ``backend`` and fit the affine map by least squares."""
        from autoprune.executor import apply_plan

        if len(plans) < 2:
            raise InvalidInputError("TableLatencyModel.fit needs at least two plans")
        self._featurizer(backend if self.miss_policy == "measure" else None)
        sums = self.base_ms(plans)
        if np.ptp(sums) <= 0:
            raise InvalidInputError("the calibration plans have equal table sums; pass plans "
                                    "of different widths")
        models = [apply_plan(model, p, example_inputs, spec=self.spec).eval() for p in plans]
        samples = backend.measure_interleaved(models, example_inputs)
        ms = np.array([s.median_ms for s in samples])
        b, a = np.polyfit(sums, ms, 1)
        if b <= 0:  # noise swamped the difference: fall back to a proportional map
            a, b = 0.0, float(ms.mean() / sums.mean())
        self.intercept_ms_, self.slope_ = float(a), float(b)
        self.anchors_ = list(zip(sums.tolist(), ms.tolist()))
        dense = [float(m) for p, m in zip(plans, ms) if not p.groups]
        self.dense_ms_ = dense[0] if dense else None
        spread = max(float(s.iqr_ms / s.median_ms) for s in samples)
        if len(plans) >= 3:
            for i in range(len(plans)):
                keep = np.arange(len(plans)) != i
                bi, ai = np.polyfit(sums[keep], ms[keep], 1)
                spread = max(spread, abs((ai + bi * sums[i]) / ms[i] - 1.0))
        self.rel_spread_ = spread
        return self

    def predict_many(self, plans: Sequence[PruningPlan]) -> np.ndarray:
        if not hasattr(self, "slope_"):
            raise NotFittedError("TableLatencyModel is not fitted; call fit(...) first")
        if len(plans) == 0:
            return np.zeros(0)
        sums = self.base_ms(plans)
        # floored like LatencyPredictor: never <= 0 even where the affine map would be
        return np.maximum(self.intercept_ms_ + self.slope_ * sums, 0.2 * self.slope_ * sums)

    def predict(self, plan: PruningPlan) -> float:
        return float(self.predict_many([plan])[0])

    def predict_interval(self, plans: Sequence[PruningPlan]) -> tuple[np.ndarray, np.ndarray]:
        p = self.predict_many(plans)
        return p * (1 - self.rel_spread_), p * (1 + self.rel_spread_)


class CallableLatencyModel:
    """A user's ``plan -> ms`` function as a ``LatencyModel``. Its interval is the point
    itself: nothing is known about its error."""

    def __init__(self, fn: Callable[[PruningPlan], float]) -> None:
        self.fn = fn

    def predict(self, plan: PruningPlan) -> float:
        return float(self.fn(plan))

    def predict_many(self, plans: Sequence[PruningPlan]) -> np.ndarray:
        return np.array([self.predict(p) for p in plans], dtype=float)

    def predict_interval(self, plans: Sequence[PruningPlan]) -> tuple[np.ndarray, np.ndarray]:
        p = self.predict_many(plans)
        return p, p


def fitted_dense_ms(model: Any) -> float | None:
    """The dense model's latency as measured while ``model`` was fitted (``dense_ms_`` of a
    ``LatencyPredictor``: the median over its paired chunks; a ``TableLatencyModel``'s dense
    anchor), or None (a callable, an unfitted model). A prediction divided by it is the
    model's estimate of the paired share of dense: its targets are on that scale, where its
    own prediction for the dense plan carries the fit's error at the extreme plan."""
    ms = getattr(model, "dense_ms_", None)  # NaN: fitted unpaired, no dense beside the plans
    return float(ms) if ms is not None and np.isfinite(ms) and ms > 0 else None


def as_latency_model(obj: Any) -> LatencyModel:
    """``obj`` if it is a ``LatencyModel``; a plain callable ``plan -> ms`` wrapped."""
    if isinstance(obj, LatencyModel):
        return obj
    if callable(obj):
        return CallableLatencyModel(obj)
    raise InvalidInputError(
        f"predictor must be a LatencyModel (LatencyPredictor, TableLatencyModel: predict, "
        f"predict_many, predict_interval) or a callable plan -> ms, got {type(obj).__name__}"
    )


__all__ = ["CallableLatencyModel", "LatencyModel", "TableLatencyModel", "as_latency_model",
           "fitted_dense_ms"]
