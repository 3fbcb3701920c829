"""Fine-tune a pruned model: masks kept, optional distillation, gradual pruning, rewinding.

``finetune(model, train_loader, ...)`` builds a ``FinetuneConfig`` and runs a ``Trainer`` with
the callbacks the options ask for. The callbacks are the same classes people plug into their
own loops (plain PyTorch, Lightning, ...): ``MaskEnforcer``, ``PruningCallback`` (=
``GradualPruning``), ``EarlyStopping``, ``Rewind``, ``Checkpoint``.

Modules: ``_config`` (``FinetuneConfig``), ``_state`` (``TrainState``, ``EpochLog``),
``_trainer`` (``Trainer``, ``FinetuneResult``, ``callbacks_for``), ``_callbacks``, ``_schedule``
(``GradualSchedule``, ``cubic_sparsity``), ``_loss`` (``distillation_loss``: the formula),
``_batch`` (the batch convention, ``split_batch``, ``evaluate_accuracy``), ``_api``
(``finetune``). All mask maths is ``autoprune.masks``.
"""

from __future__ import annotations

from autoprune._finetune._api import finetune
from autoprune._finetune._batch import evaluate_accuracy, split_batch
from autoprune._finetune._callbacks import (
    CHECKPOINT_NAME,
    CHECKPOINT_VERSION,
    Callback,
    Checkpoint,
    EarlyStopping,
    GradualPruning,
    MaskEnforcer,
    PruningCallback,
    Rewind,
)
from autoprune._finetune._config import FinetuneConfig, OptimizerName
from autoprune._finetune._loss import distillation_loss
from autoprune._finetune._schedule import GradualSchedule, cubic_sparsity
from autoprune._finetune._state import EpochLog, TrainState
from autoprune._finetune._trainer import FinetuneResult, Trainer, callbacks_for

__all__ = [
    "CHECKPOINT_NAME",
    "CHECKPOINT_VERSION",
    "Callback",
    "Checkpoint",
    "EarlyStopping",
    "EpochLog",
    "FinetuneConfig",
    "FinetuneResult",
    "GradualPruning",
    "GradualSchedule",
    "MaskEnforcer",
    "OptimizerName",
    "PruningCallback",
    "Rewind",
    "TrainState",
    "Trainer",
    "callbacks_for",
    "cubic_sparsity",
    "distillation_loss",
    "evaluate_accuracy",
    "finetune",
    "split_batch",
]
