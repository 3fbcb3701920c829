"""Latency: what each layer costs on a device, and what a whole pruned model will cost.

One concept per private module; the names below are the package's public surface.

* ``_rules`` — ``KernelRules``: the device's channel-count rules, detected once per device.
* ``_table`` — ``LatencyTable``: measured per-layer latencies of one device (CSV + JSON sidecar).
* ``_profile`` — ``profile``: measure a model's layers into a table (resumable).
* ``_featurize`` — plans → per-layer widths → table and graph features.
* ``_sampler`` — the plans a latency model is fitted on (every kind it will be asked about).
* ``_campaign`` — timing pruned variants against the dense model on the device.
* ``_dataset`` — the measured plans, as CSV + sidecar.
* ``_regressors`` — the correction models; ``_report`` — accuracy metrics.
* ``_predictor`` — ``LatencyPredictor``; ``_model`` — the ``LatencyModel`` protocol and the
  table-only ``TableLatencyModel``.
"""

from autoprune.latency._model import fitted_dense_ms
from autoprune.latency._predictor import LatencyPredictor
from autoprune.latency._profile import profile
from autoprune.latency._regressors import Regressor
from autoprune.latency._report import accuracy_metrics
from autoprune.latency._rules import (
    GROUP_SWEEP_WIDTHS,
    SWEEP_WIDTHS,
    KernelRules,
    cached_kernel_rules,
    detect_kernel_rules,
    rules_from_sweep,
    sweep_layers,
)
from autoprune.latency._table import LatencyTable

__all__ = ["GROUP_SWEEP_WIDTHS", "SWEEP_WIDTHS", "KernelRules", "LatencyPredictor",
           "LatencyTable", "Regressor", "accuracy_metrics", "cached_kernel_rules",
           "detect_kernel_rules", "fitted_dense_ms", "profile", "rules_from_sweep",
           "sweep_layers"]
