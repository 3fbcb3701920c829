"""``finetune(model, train_loader, ...)``: build a ``FinetuneConfig`` and run a ``Trainer``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoprune._finetune._config import FinetuneConfig, OptimizerName
from autoprune._finetune._loss import LossFn
from autoprune._finetune._schedule import GradualSchedule
from autoprune._finetune._trainer import FinetuneResult, Trainer

__all__ = ["finetune"]


def finetune(
    model: nn.Module,
    train_loader: Iterable[Any],
    *,
    epochs: int = 3,
    steps: int | None = None,
    lr: float = 0.01,
    optimizer: OptimizerName = "sgd",
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    warmup_steps: int = 0,
    teacher: nn.Module | None = None,
    kd_temperature: float = 4.0,
    kd_weight: float = 0.5,
    val_loader: Iterable[Any] | None = None,
    val_metric: Callable[[nn.Module], float] | None = None,
    early_stopping_patience: int | None = None,
    restore_best: bool = True,
    checkpoint_dir: str | Path | None = None,
    gradual: GradualSchedule | Mapping[str, Any] | None = None,
    rewind: int | None = None,
    bn_l1: float = 0.0,
    bn_recalibration_batches: int = 10,
    loss_fn: LossFn | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> FinetuneResult:
    """Train ``model`` in place (masks kept) and return a ``FinetuneResult``.

    ``Trainer(model, train_loader, FinetuneConfig(...), teacher=..., val_loader=...,
    val_metric=..., loss_fn=...).fit()`` with the callbacks the options ask for
    (``callbacks_for``); see ``FinetuneConfig`` for each option.

    - ``epochs`` passes over ``train_loader``, or exactly ``steps`` optimiser steps if given.
    - Learning rate: cosine decay from ``lr`` to 0 over all steps (optional linear warm-up).
    - ``teacher``: the dense model; adds distillation (formula in ``autoprune._finetune._loss``).
    - ``val_loader`` (top-1 accuracy) or ``val_metric(model) -> float`` (higher is better) is
      evaluated after each epoch; ``early_stopping_patience`` epochs without improvement stop
      training; with ``restore_best`` the best weights are loaded back at the end.
    - ``checkpoint_dir``: a checkpoint is written atomically after every epoch and training
      resumes from it when the directory already holds one (same arguments expected).
    - ``gradual``: a ``GradualSchedule`` (or dict of its fields); cubic ramp to the targets.
    - ``rewind=k``: lottery-ticket rewinding; after training, the surviving weights (and BN
      statistics) are reset to their values at step ``k`` and trained again for the remaining
      ``total - k`` steps with the final masks fixed and the LR schedule replayed from ``k``.
    - ``bn_l1``: L1 penalty on BatchNorm scales (network slimming).
    - ``bn_recalibration_batches``: BatchNorm statistics re-estimated from that many training
      batches before the first step and after the last (0: off; see ``FinetuneConfig``).
    """
    config = FinetuneConfig(
        epochs=epochs, steps=steps, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
        momentum=momentum, warmup_steps=warmup_steps, kd_temperature=kd_temperature,
        kd_weight=kd_weight, early_stopping_patience=early_stopping_patience,
        restore_best=restore_best, checkpoint_dir=checkpoint_dir,
        gradual=gradual,  # type: ignore[arg-type]  # a dict is converted by FinetuneConfig
        rewind=rewind, bn_l1=bn_l1, bn_recalibration_batches=bn_recalibration_batches,
        device=device, seed=seed, progress=progress,
    )
    trainer = Trainer(model, train_loader, config, teacher=teacher, val_loader=val_loader,
                      val_metric=val_metric, loss_fn=loss_fn)
    return trainer.fit()
