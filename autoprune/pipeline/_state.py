"""``RunState``: ``run_dir/state.json`` (which steps completed, small values they produced) and
the ``step()`` context manager that times each step, records how it ended and marks it
complete, so a rerun skips what is done.

    with state.step(Step.VERIFY, artefact=run_dir / "verify.json") as st:
        if st.resumed:                      # completed earlier and its artefact exists
            report = load(...)
        else:
            report = measure(...)
            st.record(verified=True)       # stored in state.json when the step completes

A step whose body raises is neither timed nor completed (a rerun runs it again).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from autoprune.errors import CorruptFileError, InvalidInputError
from autoprune.io import atomic_write_json, read_json

STATE_VERSION = 1


class Step(str, Enum):
    """Pipeline steps, in order."""

    ANALYZE = "analyze"
    PROFILE = "profile"
    PREDICTOR = "predictor"
    SEARCH = "search"
    APPLY = "apply"
    FINETUNE = "finetune"
    VERIFY = "verify"
    EXPORT = "export"

    def __str__(self) -> str:
        return self.value


@dataclass
class StepRun:
    """One step in progress: ``resumed`` (completed by an earlier run, its artefact on disk);
    ``status`` ends up in ``PipelineReport.steps`` (``ran``, ``skipped (...)``)."""

    step: Step
    resumed: bool
    status: str = "ran"
    complete: bool = True
    values: dict[str, Any] = field(default_factory=dict)

    def skip(self, reason: str, *, complete: bool = True) -> None:
        """The step did not run: ``reason`` says why (``complete=False``: a rerun must not
        treat it as done, e.g. when its input was passed in)."""
        self.status = f"skipped ({reason})"
        self.complete = complete

    def record(self, **values: Any) -> None:
        """Values to store in ``state.json`` when the step completes."""
        self.values.update(values)


class RunState:
    """``state.json`` of a run directory plus this run's step statuses and seconds."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / "state.json"
        self.data: dict[str, Any] = {"version": STATE_VERSION, "completed": [], "values": {}}
        #: this run: step -> "ran" / "skipped (...)", step -> seconds
        self.steps: dict[str, str] = {}
        self.seconds: dict[str, float] = {}

    @classmethod
    def load(cls, run_dir: str | Path) -> RunState:
        """The state of ``run_dir`` (empty if it has none yet)."""
        state = cls(run_dir)
        if state.path.exists():
            data = read_json(state.path)
            if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
                got = data.get("version") if isinstance(data, dict) else data
                raise CorruptFileError(f"{state.path}: state version {got!r} is not "
                                       f"{STATE_VERSION}; use a new run_dir")
            if not isinstance(data.get("completed"), list) or \
                    not isinstance(data.get("values"), dict):
                raise CorruptFileError(f"{state.path}: no 'completed' list or 'values' object; "
                                       "delete it (or use a new run_dir) to start over")
            state.data = data
        return state

    def done(self, step: Step) -> bool:
        return Step(step).value in self.data["completed"]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data["values"].get(key, default)

    def set(self, **values: Any) -> None:
        self.data["values"].update(values)
        self.save()

    def complete(self, step: Step, **values: Any) -> None:
        step = Step(step)
        if step.value not in self.data["completed"]:
            self.data["completed"].append(step.value)
        self.data["values"].update(values)
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    @contextmanager
    def step(self, step: Step, *, artefact: str | Path | None = None,
             resumable: bool = True) -> Iterator[StepRun]:
        """Run one step: yields a :class:`StepRun` whose ``resumed`` is True when the step
        completed in an earlier run and ``artefact`` (if given) exists (``resumable=False``:
        always run); on a normal exit records the seconds and the status, and marks the step
        complete with the values given to ``StepRun.record``."""
        if not isinstance(step, Step):
            raise InvalidInputError(f"step must be a pipeline Step, got {step!r}")
        where = Path(artefact) if artefact is not None else None
        resumed = resumable and self.done(step) and (where is None or where.exists())
        run = StepRun(step, resumed)
        if resumed:
            run.status = f"skipped (done: {where.name})" if where is not None else "skipped (done)"
        t0 = time.perf_counter()
        yield run
        self.seconds[step.value] = round(time.perf_counter() - t0, 2)
        self.steps[step.value] = run.status
        if run.complete:
            self.complete(step, **run.values)
        elif run.values:
            self.set(**run.values)
