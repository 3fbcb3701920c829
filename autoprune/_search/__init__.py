"""The search stage (private package; the public names are re-exported by ``autoprune``).

- ``_optimize``: :func:`optimize`, the pure stage (a ``SearchProblem`` + a strategy -> the
  trials, each with its plan JSON), and :func:`trials_frame`;
- ``_finalists``: :func:`select_finalists`, the one way a plan is chosen by measuring (used by
  ``search`` and ``run_pipeline``), and :func:`candidate_order`, its documented order;
- ``_refine``: :func:`refine_proxies`, a costlier second proxy for the best trials (two
  fidelities; ``search(refine_evaluator=...)``);
- ``_result``: :class:`SearchResult`, :func:`pareto_front`, :func:`knee_index`;
- ``_facade``: :func:`search` (analyze -> profile -> fit -> optimize -> select_finalists).

The plot lives in ``autoprune.visualization`` (imported lazily by ``SearchResult.plot``).
"""

from __future__ import annotations

from autoprune._search._facade import check_budget, run_stem, search
from autoprune._search._finalists import (
    FINALIST_COLUMNS,
    Finalists,
    candidate_order,
    select_finalists,
)
from autoprune._search._optimize import (
    CachedProxy,
    LatencyUnavailable,
    latency_fn,
    optimize,
    trials_frame,
)
from autoprune._search._refine import REFINED_COLUMN, refine_proxies
from autoprune._search._result import (
    INTERVAL_COLUMNS,
    PLAN_COLUMN,
    RESULT_SCHEMA_VERSION,
    TRIAL_COLUMNS,
    SearchResult,
    knee_index,
    pareto_front,
)

#: the old private name (tests/test_strategies.py uses it)
_latency_fn = latency_fn

__all__ = [
    "FINALIST_COLUMNS",
    "INTERVAL_COLUMNS",
    "PLAN_COLUMN",
    "REFINED_COLUMN",
    "RESULT_SCHEMA_VERSION",
    "TRIAL_COLUMNS",
    "CachedProxy",
    "Finalists",
    "LatencyUnavailable",
    "SearchResult",
    "candidate_order",
    "check_budget",
    "knee_index",
    "latency_fn",
    "optimize",
    "pareto_front",
    "refine_proxies",
    "run_stem",
    "search",
    "select_finalists",
    "trials_frame",
]
