"""``FinetuneConfig``: every option of the fine-tuning loop, validated when it is built."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch

from autoprune._finetune._schedule import GradualSchedule
from autoprune.errors import InvalidInputError

__all__ = ["FinetuneConfig", "OptimizerName"]

OptimizerName = Literal["sgd", "adamw"]
_OPTIMIZERS = ("sgd", "adamw")


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(float(v))


@dataclass(frozen=True)
class FinetuneConfig:
    """Options of ``finetune`` / ``Trainer`` (the objects — model, loaders, teacher, metric,
    loss — are passed beside it). Bad values raise ``InvalidInputError`` naming the field, the
    value and what is allowed, when the config is built.

    - ``epochs`` passes over the loader, or exactly ``steps`` optimiser steps if given.
    - ``lr``: cosine decay from ``lr`` to 0 over all steps after ``warmup_steps`` of linear
      warm-up; ``optimizer`` ``"sgd"`` (Nesterov when ``momentum > 0``) or ``"adamw"``.
    - ``kd_temperature`` / ``kd_weight``: distillation when a teacher is given.
    - ``early_stopping_patience``: epochs without a better validation metric before stopping
      (needs a validation loader or metric); ``restore_best`` loads the best epoch back.
    - ``checkpoint_dir``: a checkpoint after every epoch; training resumes from it.
    - ``gradual``: a ``GradualSchedule`` (a dict of its fields is converted).
    - ``rewind``: lottery-ticket rewinding to step ``rewind`` after training.
    - ``bn_l1``: L1 penalty on BatchNorm scales; ``device``, ``seed``, ``progress`` (a bar).
    - ``bn_recalibration_batches``: before the first step (not on resume) and after the last,
      BatchNorm running statistics are re-estimated from this many training batches (0: off).
      A pruned model's inherited statistics are wrong for its new widths: on digits, resnet18
      at keep 0.35 reached 24.8% after one epoch without it and 93.3% with it (BENCHMARKS.md).
    """

    epochs: int = 3
    steps: int | None = None
    lr: float = 0.01
    optimizer: OptimizerName = "sgd"
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_steps: int = 0
    kd_temperature: float = 4.0
    kd_weight: float = 0.5
    early_stopping_patience: int | None = None
    restore_best: bool = True
    checkpoint_dir: str | Path | None = None
    gradual: GradualSchedule | None = None
    rewind: int | None = None
    bn_l1: float = 0.0
    bn_recalibration_batches: int = 10
    device: str | torch.device = "cpu"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, want: str) -> InvalidInputError:
            return InvalidInputError(f"{name} must be {want}, got {getattr(self, name)!r}")

        if self.steps is not None and (not _is_int(self.steps) or self.steps < 1):
            raise bad("steps", "an int >= 1 or None")
        if not _is_int(self.epochs) or (self.epochs < 1 and self.steps is None):
            raise bad("epochs", "an int >= 1 (or give steps=)")
        if not _is_real(self.lr) or self.lr <= 0:
            raise bad("lr", "a finite number > 0")
        if self.optimizer not in _OPTIMIZERS:
            raise InvalidInputError(
                f"unknown optimizer {self.optimizer!r}; allowed: {', '.join(_OPTIMIZERS)}"
            )
        if not _is_real(self.weight_decay) or self.weight_decay < 0:
            raise bad("weight_decay", "a finite number >= 0")
        if not _is_real(self.momentum) or not 0.0 <= self.momentum < 1.0:
            raise bad("momentum", "a number in [0, 1)")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise bad("warmup_steps", "an int >= 0")
        if not _is_real(self.kd_temperature) or self.kd_temperature <= 0:
            raise bad("kd_temperature", "a finite number > 0")
        if not _is_real(self.kd_weight) or not 0.0 <= self.kd_weight <= 1.0:
            raise bad("kd_weight", "a number in [0, 1]")
        if self.early_stopping_patience is not None and (
                not _is_int(self.early_stopping_patience) or self.early_stopping_patience < 1):
            raise bad("early_stopping_patience", "an int >= 1 or None")
        if not isinstance(self.restore_best, bool):
            raise bad("restore_best", "True or False")
        if self.checkpoint_dir is not None:
            if not isinstance(self.checkpoint_dir, (str, Path)):
                raise bad("checkpoint_dir", "a directory path (str or Path) or None")
            object.__setattr__(self, "checkpoint_dir", Path(self.checkpoint_dir))
        object.__setattr__(self, "gradual", GradualSchedule.coerce(self.gradual))
        if self.rewind is not None and (not _is_int(self.rewind) or self.rewind < 0):
            raise bad("rewind", "an int >= 0 (the step to rewind to) or None")
        if not _is_real(self.bn_l1) or self.bn_l1 < 0:
            raise bad("bn_l1", "a finite number >= 0")
        if not _is_int(self.bn_recalibration_batches) or self.bn_recalibration_batches < 0:
            raise bad("bn_recalibration_batches", "an int >= 0 (0: no recalibration)")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError, ValueError):
            raise bad("device", 'a torch device such as "cpu" or "cuda:0"') from None
        if not _is_int(self.seed):
            raise bad("seed", "an int")
        if not isinstance(self.progress, bool):
            raise bad("progress", "True or False")

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> FinetuneConfig:
        """A config from a dict of its fields; an unknown key raises, listing the known ones."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise InvalidInputError(
                f"unknown fine-tuning options {unknown}; allowed: {', '.join(known)}"
            )
        return cls(**dict(options))
