"""Greedy knapsack-style baseline over the latency model.

Starting from the dense plan, each step narrows the one group (by one step of its width grid,
or switches it to 2:4 where the space offers that) that saves the most predicted latency per
unit of importance lost (``problem.importance``: by default the data-free weight-magnitude
proxy; ``search(importance="sensitivity")`` gives the evaluator's measured drop per group,
``SensitivityProxy``), until the predicted latency is within the budget. The path it walks is a cheap accuracy/latency curve:
``GreedyStrategy`` evaluates ``n_trials`` plans along it with the real proxy, and its end point
is enqueued as the warm start of the Optuna strategies (``greedy_plan``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from autoprune.errors import InvalidInputError
from autoprune.strategies.base import MAXIMIZE, SearchProblem, Strategy, plan_key
from autoprune.types import Structure

if TYPE_CHECKING:
    import optuna

    from autoprune.plan import PruningPlan


def greedy_path(problem: SearchProblem, stop_ms: float | None = None, max_moves: int = 10_000,
                steps_per_grid: int = 16) -> list[tuple[PruningPlan, float, float]]:
    """(plan, predicted ms, importance) from dense down to ``stop_ms`` (default: the budget)
    or until nothing can be narrowed further. Each move takes ``ceil(len(grid)/steps_per_grid)``
    grid steps, so a long grid is walked in at most ``steps_per_grid`` moves."""
    space = problem.space
    imp = problem.importance
    if imp is None:
        raise InvalidInputError("greedy needs problem.importance (a plan evaluator)")
    stop = problem.budget_ms if stop_ms is None else stop_ms
    groups = [c for c in space.searchable_groups if c.kind == "channel"]
    params: dict[str, Any] = {}
    for c in groups:
        if Structure.CHANNEL in c.structures and len(c.structures) > 1:
            params[f"structure:{c.name}"] = Structure.CHANNEL.value
        elif Structure.NONE in c.structures:
            params[f"structure:{c.name}"] = Structure.NONE.value
        if len(c.widths) > 1:
            params[f"keep:{c.name}"] = len(c.widths) - 1
    plan = space.decode(params)
    lat = float(problem.latency_ms([plan])[0])
    score = float(imp.evaluate_plan(plan))
    path = [(plan, lat, score)]
    for _ in range(max_moves):
        if lat <= stop:
            break
        moves: list[dict[str, Any]] = []
        for c in groups:
            s = params.get(f"structure:{c.name}", Structure.CHANNEL.value)
            idx = params.get(f"keep:{c.name}")
            if s == Structure.CHANNEL.value and idx is not None and idx > 0:
                step = max(1, math.ceil(len(c.widths) / steps_per_grid))
                moves.append({**params, f"keep:{c.name}": max(0, idx - step)})
            if Structure.NM in c.structures and s != Structure.NM.value and (
                    idx is None or idx == len(c.widths) - 1):
                moves.append({**params, f"structure:{c.name}": Structure.NM.value})
        if not moves:
            break
        plans = [space.decode(m) for m in moves]
        lats = np.asarray(problem.latency_ms(plans), dtype=float)
        scores = np.array([imp.evaluate_plan(p) for p in plans], dtype=float)
        saved = lat - lats
        lost = np.maximum(score - scores, 1e-9)
        if np.any(saved > 0):
            ratio = np.where(saved > 0, saved / lost, -np.inf)
            best = int(np.argmax(ratio))
        else:  # a flat step of the latency curve: take the cheapest loss and go on
            best = int(np.argmin(lost))
        params, plan, lat, score = moves[best], plans[best], float(lats[best]), float(scores[best])
        path.append((plan, lat, score))
    return path


def greedy_plan(problem: SearchProblem) -> PruningPlan | None:
    """The first plan on the greedy path predicted within the budget (None if none is)."""
    path = greedy_path(problem)
    plan, lat, _ = path[-1]
    return plan if lat <= problem.budget_ms else None


def uniform_plan(problem: SearchProblem, steps: int = 64) -> PruningPlan | None:
    """The widest uniform plan of the space (every channel group at the same keep ratio, on
    the space's width grid) predicted within the budget; None if even the narrowest is not.

    Enqueued beside the greedy plan as a warm start, so the search always scores the plan a
    user would try first by hand and has to beat it on the proxy to pick anything else."""
    space = problem.space
    plans: list[PruningPlan] = []
    seen: set[str] = set()
    for r in np.linspace(1.0, 0.0, steps + 1)[1:-1]:
        plan = space.uniform_plan(float(r))
        key = plan_key(plan)
        if key not in seen:
            seen.add(key)
            plans.append(plan)
    if not plans:
        return None
    lats = np.asarray(problem.latency_ms(plans), dtype=float)
    ok = np.flatnonzero(lats <= problem.budget_ms)
    return plans[int(ok[0])] if ok.size else None


def warm_start_plans(problem: SearchProblem) -> list[PruningPlan]:
    """The greedy plan and the widest uniform plan within the budget (those that exist,
    without repeats): the first trials of the Optuna strategies."""
    out: list[PruningPlan] = []
    for plan in (greedy_plan(problem) if problem.importance is not None else None,
                 uniform_plan(problem)):
        if plan is not None and all(plan_key(plan) != plan_key(o) for o in out):
            out.append(plan)
    return out


class GreedyStrategy(Strategy):
    """Evaluate ``n_trials`` plans along the greedy path: its end point within the budget, the
    rest spread evenly in predicted latency down to ``extend`` x budget (for the front)."""

    name = "greedy"
    directions = [MAXIMIZE]

    def __init__(self, extend: float = 0.6) -> None:
        self.extend = extend

    def sampler(self, seed: int) -> Any:
        import optuna

        return optuna.samplers.RandomSampler(seed=seed)  # unused: every trial is enqueued

    def run(self, problem: SearchProblem, n_trials: int, timeout_s: float | None = None
            ) -> optuna.Study:
        import time

        study = self.open(problem)
        problem.drain_waiting(self.n_objectives)
        remaining = n_trials - problem.n_done(study)
        if remaining <= 0:
            return study
        if not 0 < self.extend <= 1:
            raise InvalidInputError(f"extend must be in (0, 1], got {self.extend!r}")
        path = greedy_path(problem, stop_ms=problem.budget_ms * self.extend)
        lats = np.array([p[1] for p in path])
        feasible = [i for i, (_, lat, _) in enumerate(path) if lat <= problem.budget_ms]
        chosen: list[int] = []
        if feasible:
            chosen.append(feasible[0])
        if n_trials > 1:
            targets = np.linspace(lats.max(), lats.min(), n_trials)
            for t in targets:
                i = int(np.argmin(np.abs(lats - t)))
                if i not in chosen:
                    chosen.append(i)
        done = {_key(p) for p in _done_plans(study)}
        t0 = time.monotonic()
        for i in chosen:
            if problem.n_done(study) >= n_trials:
                break
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                break
            plan = path[i][0]
            if _key(plan.to_dict()) in done:
                continue
            problem.run_params(problem.space.encode(plan), self.n_objectives)
        return study


def _done_plans(study: optuna.Study) -> list[dict[str, Any]]:
    return [t.user_attrs["plan"] for t in study.get_trials(deepcopy=False)
            if "plan" in t.user_attrs]


def _key(d: dict[str, Any]) -> str:
    import json

    return json.dumps(d, sort_keys=True)
