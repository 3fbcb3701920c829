"""Search strategies behind one interface (``Strategy.run(problem, n_trials)``), by name:
``tpe`` (default), ``nsga2``, ``motpe``, ``random``, ``rl`` (optional extra), ``greedy``; or any
``optuna.samplers.BaseSampler`` instance. Unknown names raise ``UnknownNameError``."""

from __future__ import annotations

from autoprune.strategies._registry import get_strategy, list_strategies
from autoprune.strategies.base import SearchProblem, Strategy, TrialFailure, plan_key

__all__ = ["SearchProblem", "Strategy", "TrialFailure", "get_strategy", "list_strategies",
           "plan_key"]
