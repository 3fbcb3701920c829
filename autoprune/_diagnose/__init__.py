"""``diagnose`` and ``repair``: for any pruned model (autoprune's or another tool's), where the
time goes on a device and the nearest plan on the device's fast widths.

Private modules:

- ``_match``: the pruned model read against its reference (structure check, per-group
  widths -> ``PruningPlan``, masks and zeroed weights, which reference channels it kept);
- ``_context``: what both stages share (backend, the reference's spec, table, kernel rules);
- ``_report``: ``diagnose`` and ``DiagnosisReport``;
- ``_rebuild``: a repaired model from the pruned model's own weights (reference channels
  by index, torch-pruning through the executor's glue);
- ``_repair``: ``repair`` and ``RepairResult`` (candidates, paired measurement).
"""

from __future__ import annotations

from autoprune._diagnose._repair import RepairResult, repair
from autoprune._diagnose._report import DiagnosisReport, diagnose

__all__ = ["DiagnosisReport", "RepairResult", "diagnose", "repair"]
