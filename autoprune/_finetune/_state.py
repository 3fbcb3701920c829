"""``TrainState``: where a fine-tuning run stands (what a checkpoint stores besides the weights).

The loop's own state is typed here; each callback keeps its own state (``state_dict()``), which
``Checkpoint`` stores beside it. Both round-trip through plain dicts of numbers, strings, lists
and tensors, so ``torch.load(weights_only=True)`` reads them back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from autoprune.errors import InvalidInputError

__all__ = ["HISTORY_COLUMNS", "EpochLog", "TrainState"]

HISTORY_COLUMNS = ("phase", "epoch", "step", "lr", "train_loss", "val_metric", "masked_sparsity")


@dataclass(frozen=True)
class EpochLog:
    """One row of ``FinetuneResult.history``: the end of one epoch."""

    phase: str
    epoch: int
    step: int
    lr: float
    train_loss: float
    val_metric: float | None
    masked_sparsity: float


@dataclass
class TrainState:
    """The loop's position and log.

    - ``phase``: ``"train"``, then ``"rewind"`` when rewinding (``Trainer.phases``).
    - ``step``: optimiser steps done (the LR schedule's clock; a rewind sets it back to k).
    - ``epoch``: epochs finished in this phase (the next epoch to run).
    - ``stop_requested``: a callback asked to end this phase (early stopping).
    - ``stopped_early``: some phase ended that way. ``done``: the last phase finished.
    - ``history``: one ``EpochLog`` per finished epoch, all phases.
    """

    phase: str = "train"
    step: int = 0
    epoch: int = 0
    stop_requested: bool = False
    stopped_early: bool = False
    done: bool = False
    history: list[EpochLog] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (``from_dict`` reads it back)."""
        out = asdict(self)
        out["history"] = [asdict(r) for r in self.history]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainState:
        """The state ``to_dict`` wrote; a missing or mistyped field raises ``InvalidInputError``."""
        if not isinstance(data, Mapping):
            raise InvalidInputError(f"a train state must be a dict, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise InvalidInputError(f"train state lacks {missing}")
        kinds: dict[str, type | tuple[type, ...]] = {
            "phase": str, "step": int, "epoch": int, "stop_requested": bool,
            "stopped_early": bool, "done": bool, "history": list,
        }
        for name, kind in kinds.items():
            value = data[name]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise InvalidInputError(
                    f"train state field {name!r} is {value!r}, not a {getattr(kind, '__name__', kind)}"
                )
        try:
            history = [EpochLog(**dict(r)) for r in data["history"]]
        except TypeError as e:
            raise InvalidInputError(f"train state history row does not fit EpochLog: {e}") from None
        return cls(**{n: data[n] for n in names if n != "history"}, history=history)
