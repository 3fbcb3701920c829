"""Regressors of whole-model latency on plan features (deterministic given random_state).

Every model predicts a positive latency: the linear part has non-negative coefficients and a
non-negative intercept on non-negative features, and ``LatencyPredictor`` floors predictions
at a stated share of the table sum.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import numpy as np


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



class _LinearModel:
    """Linear model with non-negative coefficients *and intercept*, fitted on relative error
    (weights 1/y^2). On non-negative features its prediction is never negative, and it is
    monotone in every feature."""

    def __init__(self) -> None:
        from sklearn.linear_model import LinearRegression

        # the intercept is a constant column under the same positivity constraint
        self.model = LinearRegression(positive=True, fit_intercept=False)
        self.scale: np.ndarray | None = None

    def fit(self, x: np.ndarray, y: np.ndarray) -> _LinearModel:
        self.scale = np.maximum(np.abs(x).max(axis=0), 1e-12)
        self.model.fit(self._design(x), y, sample_weight=1.0 / y**2)
        return self

    def _design(self, x: np.ndarray) -> np.ndarray:
        return np.hstack([x / self.scale, np.ones((len(x), 1))])

    def predict(self, x: np.ndarray) -> np.ndarray:
        # the same arithmetic as LinearRegression.predict without its per-call validation
        return np.asarray(self._design(x) @ self.model.coef_, dtype=float)


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
        return np.asarray(self.linear.predict(x) + self.trees.predict(x), dtype=float)


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
        return np.asarray(self.model.predict(x) * x[:, self.table_col], dtype=float)



def make_regressor(name: str, random_state: int, table_col: int) -> Any:
    """A fresh, unfitted regressor by name (``linear``, ``boosted``, ``gbr``)."""
    if name == "linear":
        return _LinearModel()
    if name == "boosted":
        return _BoostedModel(random_state)
    return _RatioGBR(random_state, table_col)


__all__ = ["Regressor", "make_regressor"]
