"""Optuna samplers as strategies: ``tpe`` (default), ``nsga2``, ``motpe``, ``random``, or any
``optuna.samplers.BaseSampler`` a user passes.

- ``tpe``: one objective, maximise the proxy, with predicted latency <= budget expressed through
  Optuna's trial constraint (``trial.set_constraint``) (feasible trials are preferred by the sampler).
- ``nsga2`` / ``motpe``: two objectives (maximise proxy, minimise predicted latency) with the same
  constraint: their non-dominated feasible trials trace the accuracy/latency front.
- ``random``: uniform sampling over the space, the baseline.

Unless ``warm_start=False``, the greedy plan for the budget and the widest uniform plan within
it are enqueued as the first trials of a new study (``random`` never gets them, so that it
stays a pure baseline): the search must beat the uniform plan on the proxy to pick another.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Literal

from autoprune.errors import InvalidInputError
from autoprune.strategies.base import MAXIMIZE, MINIMIZE, SearchProblem, Strategy, TrialFailure

if TYPE_CHECKING:
    import optuna

OptunaName = Literal["tpe", "nsga2", "motpe", "random", "custom"]


class OptunaStrategy(Strategy):
    """Search with an Optuna sampler (see the module docstring)."""

    def __init__(
        self,
        sampler_name: OptunaName = "tpe",
        *,
        sampler: Any = None,
        multi_objective: bool | None = None,
        warm_start: bool | None = None,
        n_startup_trials: int | None = None,
        population_size: int | None = None,
    ) -> None:
        self.sampler_name = sampler_name
        self.custom_sampler = sampler
        self.multi_objective = multi_objective
        self.warm_start = warm_start
        self.n_startup_trials = n_startup_trials
        self.population_size = population_size
        self.name = sampler_name if sampler_name != "custom" else type(sampler).__name__
        multi = multi_objective if multi_objective is not None else sampler_name in (
            "nsga2", "motpe")
        self.directions = [MAXIMIZE, MINIMIZE] if multi else [MAXIMIZE]

    @classmethod
    def from_sampler(cls, sampler: Any, multi_objective: bool | None = None,
                     warm_start: bool | None = None) -> OptunaStrategy:
        """Wrap a user's sampler; NSGA-II/III default to two objectives, others to one."""
        import optuna

        if multi_objective is None:
            multi_objective = isinstance(sampler, (optuna.samplers.NSGAIISampler,
                                                   optuna.samplers.NSGAIIISampler))
        return cls("custom", sampler=sampler, multi_objective=multi_objective,
                   warm_start=warm_start)

    def sampler(self, seed: int, n_trials: int = 100) -> Any:
        import optuna

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if self.sampler_name == "custom":
                return self.custom_sampler
            if self.sampler_name in ("tpe", "motpe"):
                startup = self.n_startup_trials
                if startup is None:
                    startup = max(5, min(20, n_trials // 5))
                return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup,
                                                  multivariate=True)
            if self.sampler_name == "nsga2":
                pop = self.population_size or max(8, min(50, n_trials // 5))
                return optuna.samplers.NSGAIISampler(seed=seed, population_size=pop)
            if self.sampler_name == "random":
                return optuna.samplers.RandomSampler(seed=seed)
        raise InvalidInputError(  # pragma: no cover - guarded by the registry
            f"unknown Optuna strategy {self.sampler_name!r}; allowed: tpe, nsga2, motpe, random"
        )

    def open(self, problem: SearchProblem, n_trials: int = 100) -> optuna.Study:
        return problem.open_study(self.directions, self.sampler(problem.seed, n_trials),
                                  self.name)

    def run(self, problem: SearchProblem, n_trials: int, timeout_s: float | None = None
            ) -> optuna.Study:
        study = self.open(problem, n_trials)
        remaining = n_trials - problem.n_done(study)
        if remaining <= 0:
            return study
        warm = self.warm_start if self.warm_start is not None else self.sampler_name != "random"
        if warm and len(study.trials) == 0:
            from autoprune.strategies.greedy import warm_start_plans

            for plan in warm_start_plans(problem):
                study.enqueue_trial(problem.space.encode(plan))

        def stop_when_done(study: optuna.Study, _trial: Any) -> None:
            if problem.n_done(study) >= n_trials:
                study.stop()

        n_obj = self.n_objectives
        study.optimize(
            lambda trial: problem.objective(trial, n_obj),
            n_trials=remaining,
            timeout=timeout_s,
            catch=(TrialFailure,),
            callbacks=[*problem.callbacks, stop_when_done],
            gc_after_trial=False,
            show_progress_bar=False,
        )
        return study
