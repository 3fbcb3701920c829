"""Accuracy of a latency model against measured latencies (the numbers ``report_`` shows)."""

from __future__ import annotations

import numpy as np

METHODS = ("predictor", "table_sum", "flops_linear")
REPORT_COLUMNS = ("within_5pct", "within_10pct", "mape", "spearman", "n_holdout")


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


def interval_coverage(measured_ms: np.ndarray, low_ms: np.ndarray, high_ms: np.ndarray) -> float:
    """Share of measurements inside their predicted interval."""
    y = np.asarray(measured_ms, dtype=float)
    return float(np.mean((y >= np.asarray(low_ms)) & (y <= np.asarray(high_ms)))) if len(y) \
        else float("nan")


__all__ = ["METHODS", "REPORT_COLUMNS", "accuracy_metrics", "interval_coverage"]
