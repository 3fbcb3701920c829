"""The search problem every strategy solves, the ``Strategy`` interface, and the registry.

A ``SearchProblem`` bundles the space, the latency model (predicted ms of a plan), the proxy
(higher is better) and the budget, plus the Optuna study that records every trial. Every
strategy, Optuna-based or not, records its trials in that study, so results, resume and
multi-worker runs work the same way for all of them.

Trial bookkeeping (user attributes of each Optuna trial): ``plan`` (plan JSON object),
``predicted_latency_ms``, ``macs``, ``params``, ``constraint`` (predicted - budget, > 0 means
infeasible; also set as the Optuna constraint ``latency`` that TPE and NSGA-II honour),
``error`` (why a failed trial failed).
"""

from __future__ import annotations

import json
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np

from autoprune.errors import InvalidInputError

if TYPE_CHECKING:
    import optuna

    from autoprune.plan import PruningPlan
    from autoprune.space import SearchSpace

#: an objective's direction, as Optuna spells it
Direction = Literal["maximize", "minimize"]
MAXIMIZE: Final = "maximize"
MINIMIZE: Final = "minimize"


class TrialFailure(Exception):
    """The proxy failed for one plan (exception or NaN); the trial fails, the search goes on."""


def _fail(trial: Any, msg: str) -> TrialFailure:
    """Record ``msg`` as the trial's ``error`` (the search goes on) and return the failure."""
    trial.set_user_attr("error", msg[:2000])
    return TrialFailure(msg)


def plan_key(plan: PruningPlan) -> str:
    """Cache key of a plan: its JSON with sorted keys."""
    return json.dumps(plan.to_dict(), sort_keys=True, separators=(",", ":"))


@dataclass
class SearchProblem:
    """What a strategy optimises. ``latency_ms(plans) -> array`` predicts latency (vectorised);
    ``proxy(plan) -> float`` scores a plan (may raise; cached by the caller); ``importance`` is
    a data-free ``PlanEvaluator`` used by greedy and RL to judge what a step costs."""

    space: SearchSpace
    latency_ms: Callable[[Sequence[PruningPlan]], np.ndarray]
    proxy: Callable[[PruningPlan], float]
    budget_ms: float
    storage: Any = None
    study_name: str = "autoprune"
    seed: int = 0
    importance: Any = None
    callbacks: list[Callable[[Any, Any], None]] = field(default_factory=list)
    #: set by ``open_study``
    study: Any = None

    # --- study ---------------------------------------------------------------------------
    def open_study(self, directions: list[Direction], sampler: Any, strategy_name: str
                   ) -> optuna.Study:
        """Create or load (resume) the study; a stored study made for other objectives is an
        error naming both."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(storage=self.storage, study_name=self.study_name,
                                    directions=directions, sampler=sampler,
                                    load_if_exists=True)
        want = [optuna.study.StudyDirection.MAXIMIZE if d == MAXIMIZE
                else optuna.study.StudyDirection.MINIMIZE for d in directions]
        if list(study.directions) != want:
            raise InvalidInputError(
                f"study {self.study_name!r} in this storage was created with "
                f"{len(study.directions)} objective(s) and strategy "
                f"{study.user_attrs.get('strategy', '?')!r}; strategy {strategy_name!r} needs "
                f"{len(directions)}: pass another study_name or run_dir"
            )
        attrs = study.user_attrs
        if "budget_ms" in attrs and not math.isclose(float(attrs["budget_ms"]), self.budget_ms,
                                                     rel_tol=1e-9):
            raise InvalidInputError(
                f"study {self.study_name!r} was run for a {attrs['budget_ms']} ms budget; this "
                f"call asks for {self.budget_ms} ms: pass another study_name or run_dir"
            )
        if "strategy" not in attrs:
            study.set_user_attr("strategy", strategy_name)
            study.set_user_attr("budget_ms", self.budget_ms)
            study.set_user_attr("space", self.space.to_dict())
        if len(directions) > 1:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(["proxy", "predicted_latency_ms"])
        self.study = study
        return study

    def n_done(self, study: optuna.Study | None = None) -> int:
        """Trials that count toward ``n_trials``: completed, or failed by the proxy
        (interrupted trials, without an ``error``, are run again on resume)."""
        from optuna.trial import TrialState

        study = study or self.study
        n = 0
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
            if t.state == TrialState.COMPLETE or "error" in t.user_attrs:
                n += 1
        return n

    # --- one trial -------------------------------------------------------------------------
    def objective(self, trial: optuna.trial.BaseTrial, n_objectives: int = 1
                  ) -> float | tuple[float, float]:
        """Sample a plan through ``trial``, predict its latency, score it. A proxy failure
        records ``error`` and raises ``TrialFailure``."""
        plan = self.space.sample(trial)
        trial.set_user_attr("plan", plan.to_dict())
        try:
            latency = float(self.latency_ms([plan])[0])
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - a plan the latency model cannot price
            raise _fail(trial, f"latency prediction failed: {e}") from e
        if not math.isfinite(latency):
            raise _fail(trial, f"predicted latency is {latency}")
        macs, params = self.space.spec.count(plan)
        trial.set_user_attr("predicted_latency_ms", latency)
        trial.set_user_attr("macs", int(macs))
        trial.set_user_attr("params", int(params))
        trial.set_user_attr("constraint", latency - self.budget_ms)
        trial.set_constraint("latency", latency - self.budget_ms)  # > 0: over the budget
        try:
            value = float(self.proxy(plan))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - any evaluator error fails only this trial
            raise _fail(trial, f"{type(e).__name__}: {e}") from e
        if math.isnan(value) or math.isinf(value):
            raise _fail(trial, f"proxy returned {value}")
        if n_objectives == 1:
            return value
        return value, latency

    def run_params(self, params: dict[str, Any], n_objectives: int = 1
                   ) -> tuple[PruningPlan, float | None]:
        """Evaluate given parameter values as one trial (ask/tell); returns (plan, proxy or
        None if the trial failed). Used by strategies that choose plans themselves."""
        import optuna
        from optuna.trial import TrialState

        from autoprune.storage import trial_heartbeat

        study = self.study
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            study.enqueue_trial(params, skip_if_exists=False)
        trial = study.ask()
        try:
            with trial_heartbeat(study, trial):
                values = self.objective(trial, n_objectives)
        except TrialFailure:
            study.tell(trial, state=TrialState.FAIL)
            self._notify(study, trial.number)
            return self.space.decode(params), None
        except BaseException:
            try:
                study.tell(trial, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:  # pragma: no cover
                pass
            raise
        study.tell(trial, values)
        self._notify(study, trial.number)
        proxy = values if isinstance(values, float) else values[0]
        return self.space.decode(params), float(proxy)

    def drain_waiting(self, n_objectives: int = 1) -> int:
        """Evaluate trials already queued in the study (e.g. the retry of a trial whose worker
        died), so that strategies driving the study with ask/tell get their own enqueued
        parameters back from ``ask``. Returns how many were run."""
        from optuna.trial import TrialState

        n = 0
        while self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            trial = self.study.ask()
            try:
                values = self.objective(trial, n_objectives)
            except TrialFailure:
                self.study.tell(trial, state=TrialState.FAIL)
            except BaseException:
                self.study.tell(trial, state=TrialState.FAIL)
                raise
            else:
                self.study.tell(trial, values)
            self._notify(self.study, trial.number)
            n += 1
        return n

    def _notify(self, study: optuna.Study, number: int) -> None:
        if not self.callbacks:
            return
        frozen = study.get_trials(deepcopy=False)[number] if number < len(
            study.get_trials(deepcopy=False)) else None
        for cb in self.callbacks:
            cb(study, frozen)


class Strategy(ABC):
    """A search strategy. ``run`` drives the problem's study until it holds ``n_trials``
    counted trials (a resumed study only runs what is missing) or ``timeout_s`` passes."""

    name: str = ""
    #: objective directions: ["maximize"] (proxy under the budget constraint) or
    #: ["maximize", "minimize"] (proxy vs predicted latency)
    directions: list[Direction] = [MAXIMIZE]

    @abstractmethod
    def sampler(self, seed: int) -> Any:
        """The Optuna sampler the study is created with."""

    @abstractmethod
    def run(self, problem: SearchProblem, n_trials: int, timeout_s: float | None = None
            ) -> optuna.Study:
        """Search; every evaluated plan is a trial of ``problem.study``."""

    @property
    def n_objectives(self) -> int:
        return len(self.directions)

    def open(self, problem: SearchProblem) -> optuna.Study:
        return problem.open_study(self.directions, self.sampler(problem.seed), self.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
