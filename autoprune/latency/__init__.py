"""Latency: what each layer costs on a device, and what a whole pruned model will cost.

One concept per private module; the names below are the package's public surface.

* ``_table`` — ``LatencyTable``: measured per-layer latencies of one device (CSV + JSON sidecar).
* ``_profile`` — ``profile``: measure a model's layers into a table (resumable).
* ``_predictor`` — ``LatencyPredictor``: table sums corrected by a regression on measured plans.
"""

from autoprune.latency._predictor import LatencyPredictor, accuracy_metrics
from autoprune.latency._profile import profile
from autoprune.latency._table import LatencyTable

__all__ = ["LatencyPredictor", "LatencyTable", "accuracy_metrics", "profile"]
