"""``run_pipeline`` and what it reads and writes: the typed step configs, the run state and
the report. Private modules: ``_run`` (the pipeline), ``_state`` (``RunState`` and its
``step()`` context manager), ``_config`` (``SearchConfig``, ``FinetuneOptions``), ``_anchor``
(a budget fraction -> predicted ms by measurement), ``_report`` (``PipelineReport``)."""

from __future__ import annotations

from autoprune._search import candidate_order
from autoprune.pipeline._anchor import BudgetAnchor, anchor_budget_ms
from autoprune.pipeline._config import FinetuneOptions, SearchConfig
from autoprune.pipeline._report import PipelineReport
from autoprune.pipeline._run import load_pruned, run_pipeline
from autoprune.pipeline._state import STATE_VERSION, RunState, Step, StepRun

__all__ = [
    "STATE_VERSION",
    "BudgetAnchor",
    "FinetuneOptions",
    "PipelineReport",
    "RunState",
    "SearchConfig",
    "Step",
    "StepRun",
    "anchor_budget_ms",
    "candidate_order",
    "load_pruned",
    "run_pipeline",
]
