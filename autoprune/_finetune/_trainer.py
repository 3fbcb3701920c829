"""``Trainer``: the fine-tuning loop, with every feature beyond the plain loop in a callback.

The loop itself does: device placement, ``DistributedDataParallel`` under ``torchrun`` (a
``DataLoader`` over a map-style dataset is rebuilt with a ``DistributedSampler``; only rank 0
writes checkpoints and shows progress), the optimiser, the cosine LR schedule with warm-up, the
loss (``_loss``), phases, the epoch log and calling the callbacks (``_callbacks``, the same
classes users put in their own loops).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from autoprune import masks
from autoprune._finetune._batch import evaluate_accuracy, split_batch, to_device
from autoprune._finetune._callbacks import (
    Callback,
    Checkpoint,
    EarlyStopping,
    MaskEnforcer,
    PruningCallback,
    Rewind,
)
from autoprune._finetune._config import FinetuneConfig
from autoprune._finetune._loss import LossFn, bn_l1_penalty, distillation_loss
from autoprune._finetune._state import HISTORY_COLUMNS, EpochLog, TrainState
from autoprune.errors import InvalidInputError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["FinetuneResult", "Trainer", "callbacks_for"]


@dataclass
class FinetuneResult:
    """What ``finetune`` / ``Trainer.fit`` return. ``history`` has one row per epoch."""

    model: nn.Module
    history: pd.DataFrame
    best_metric: float | None
    best_step: int | None
    steps_run: int
    resumed_from_step: int | None = None
    stopped_early: bool = False
    final_sparsity: float = 0.0
    extras: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        bm = "n/a" if self.best_metric is None else f"{self.best_metric:.4f}"
        return (f"FinetuneResult(steps={self.steps_run}, best_metric={bm}, "
                f"masked_sparsity={self.final_sparsity:.3f}, early_stop={self.stopped_early})")


def callbacks_for(model: nn.Module, config: FinetuneConfig, *, has_metric: bool
                  ) -> list[Callback]:
    """The callbacks a config asks for, in the order ``Trainer`` runs them: mask keeping
    (``PruningCallback`` with the gradual schedule, else ``MaskEnforcer``), ``EarlyStopping``
    (whenever there is a validation metric: it also tracks the best epoch), ``Rewind``,
    ``Checkpoint``."""
    out: list[Callback] = [
        PruningCallback(model, config.gradual) if config.gradual is not None
        else MaskEnforcer(model)
    ]
    if has_metric:
        out.append(EarlyStopping(model, config.early_stopping_patience, config.restore_best))
    if config.rewind is not None:
        out.append(Rewind(model, config.rewind))
    if config.checkpoint_dir is not None:
        out.append(Checkpoint(config.checkpoint_dir))
    return out


def _calibration_batches(loader: Any, seed: int) -> Any:
    """Batches for BatchNorm recalibration: a DataLoader over a map-style dataset is re-read in
    a shuffle seeded by ``seed`` (a sorted dataset's first batches would be one class, and the
    training loader's generator is not advanced); any other iterable is used as it is."""
    from torch.utils.data import DataLoader, IterableDataset, RandomSampler

    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset) \
            or loader.batch_size is None:
        return loader
    g = torch.Generator().manual_seed(int(seed) + 104729)
    return DataLoader(loader.dataset, batch_size=loader.batch_size,
                      sampler=RandomSampler(loader.dataset, generator=g),  # type: ignore[arg-type]
                      collate_fn=loader.collate_fn)


def _dist() -> tuple[bool, int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


def _distributed_loader(loader: Any, world: int, rank: int, seed: int) -> Any:
    """Rebuild a DataLoader over a map-style dataset with a DistributedSampler, if possible."""
    from torch.utils.data import DataLoader, IterableDataset
    from torch.utils.data.distributed import DistributedSampler

    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return loader
    if isinstance(loader.sampler, DistributedSampler):
        return loader
    shuffle = isinstance(loader.sampler, torch.utils.data.RandomSampler)
    sampler: DistributedSampler[Any] = DistributedSampler(loader.dataset, num_replicas=world, rank=rank,
                                 shuffle=shuffle, seed=seed)
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=sampler,
        num_workers=loader.num_workers, collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory, drop_last=loader.drop_last,
    )


def _cosine(step: int, total: int, warmup: int = 0) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))


class Trainer:
    """Fine-tune ``model`` in place with the callbacks ``config`` asks for, then ``callbacks``.

    ``Trainer(model, train_loader, config, teacher=, val_loader=, val_metric=, loss_fn=,
    callbacks=[...]).fit() -> FinetuneResult``. The loop: for each phase (``phases``:
    ``["train"]``, plus ``"rewind"`` added by a ``Rewind``), epochs over ``train_loader`` until
    ``total_steps`` optimiser steps; every step sets the LR (cosine, warm-up), computes the loss
    (distillation with a teacher, plus BN-L1), steps the optimiser and calls ``on_step_end``;
    every epoch is logged (``TrainState.history``: train loss, LR, validation metric from
    ``val_metric(model)`` or top-1 accuracy on ``val_loader``, masked sparsity) before
    ``on_epoch_end``. Batches follow ``split_batch``'s convention.

    What callbacks may use while ``fit`` runs: ``model`` (unwrapped), ``state`` (``TrainState``),
    ``optimizer``, ``total_steps``, ``loader``, ``rank``, ``phases``, ``masks_final``,
    ``request_stop()``, ``reset_optimizer()``, ``add_phase()``, ``barrier()``.
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: Iterable[Any],
        config: FinetuneConfig | None = None,
        *,
        teacher: nn.Module | None = None,
        val_loader: Iterable[Any] | None = None,
        val_metric: Callable[[nn.Module], float] | None = None,
        loss_fn: LossFn | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.model = model
        self.train_loader = train_loader
        self.config = config if config is not None else FinetuneConfig()
        self.teacher = teacher
        self.val_loader = val_loader
        self.val_metric = val_metric
        self.loss_fn = loss_fn
        self.extra_callbacks = list(callbacks)
        # set by fit()
        self.state = TrainState()
        self.callbacks: list[Callback] = []
        self.phases: list[str] = ["train"]
        self.total_steps = 0
        self.rank = 0
        self.resumed_from_step: int | None = None
        self.device = torch.device("cpu")
        self.loader: Iterable[Any] = train_loader
        self.train_model: nn.Module = model
        self._distributed = False

    # -- what callbacks use ---------------------------------------------------------------
    @property
    def masks_final(self) -> bool:
        """False while a gradual schedule still has mask updates to make."""
        return all(cb.masks_final for cb in self.callbacks if isinstance(cb, PruningCallback))

    def request_stop(self) -> None:
        """End the current phase after this epoch (early stopping)."""
        self.state.stop_requested = True

    def add_phase(self, name: str) -> None:
        if name not in self.phases:
            self.phases.append(name)

    def reset_optimizer(self) -> None:
        """A fresh optimiser over the trainable parameters (a rewind starts one)."""
        cfg = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                nesterov=cfg.momentum > 0)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def barrier(self) -> None:
        """Wait for every rank (no-op outside torch.distributed)."""
        if self._distributed:
            import torch.distributed as dist

            dist.barrier()

    def _keyed_callbacks(self) -> dict[str, Callback]:
        out: dict[str, Callback] = {}
        for cb in self.callbacks:
            key, i = type(cb).__name__, 1
            while key in out:
                i += 1
                key = f"{type(cb).__name__}#{i}"
            out[key] = cb
        return out

    def callback_states(self) -> dict[str, dict[str, Any]]:
        """``state_dict()`` of every callback that has state, keyed by class name (#2, ...)."""
        return {k: sd for k, cb in self._keyed_callbacks().items() if (sd := cb.state_dict())}

    def load_callback_states(self, states: Mapping[str, Mapping[str, Any]]) -> None:
        keyed = self._keyed_callbacks()
        unknown = sorted(set(states) - set(keyed))
        if unknown:
            raise InvalidInputError(
                f"the checkpoint holds state of callbacks {unknown} this run does not have "
                f"(it has {sorted(keyed)})"
            )
        for key, sd in states.items():
            keyed[key].load_state_dict(sd)

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> FinetuneResult:
        cfg = self.config
        if cfg.early_stopping_patience is not None and self.val_loader is None \
                and self.val_metric is None:
            raise InvalidInputError("early_stopping_patience needs val_loader or val_metric")
        self.device = torch.device(cfg.device)
        self._distributed, self.rank, world = _dist()
        torch.manual_seed(cfg.seed)
        base = self.model
        base.to(self.device)
        teacher_was_training = False
        if self.teacher is not None:
            # runs under no_grad (``_step``): its parameters' requires_grad stay as the user
            # left them (freezing them made the user's dense model untrainable afterwards)
            teacher_was_training = self.teacher.training
            self.teacher.to(self.device).eval()
        self.loader = (_distributed_loader(self.train_loader, world, self.rank, cfg.seed)
                       if self._distributed else self.train_loader)
        try:
            steps_per_epoch: int | None = len(self.loader)  # type: ignore[arg-type]
        except TypeError:
            steps_per_epoch = None
        if cfg.steps is None and not steps_per_epoch:
            raise InvalidInputError("train_loader has no length: pass steps= explicitly")
        self.total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * int(
            steps_per_epoch or 0)
        self.train_model = base
        if self._distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            dev = self.device
            self.train_model = DDP(base, device_ids=[dev.index] if dev.type == "cuda" else None)
        self.state = TrainState()
        self.phases = ["train"]
        self.resumed_from_step = None
        self.reset_optimizer()
        self.callbacks = self._assemble()

        for cb in self.callbacks:
            cb.on_train_begin(self)
        resumed = self.resumed_from_step is not None
        if not resumed:
            self._recalibrate()
        while not self.state.done:
            if not resumed:
                self.state.stop_requested = False
                for cb in self.callbacks:
                    cb.on_phase_begin(self)
            resumed = False
            self._run_phase()
            self.state.stopped_early = self.state.stopped_early or self.state.stop_requested
            i = self.phases.index(self.state.phase)
            self.state.done = i == len(self.phases) - 1
            for cb in self.callbacks:
                cb.on_phase_end(self)
            if not self.state.done:
                self.state.phase = self.phases[i + 1]
        for cb in self.callbacks:
            cb.on_train_end(self)
        self._recalibrate()
        if self.teacher is not None:
            self.teacher.train(teacher_was_training)
        return self._result()

    def _recalibrate(self) -> None:
        """Re-estimate BatchNorm statistics (``config.bn_recalibration_batches`` batches of a
        seeded shuffle of the training set, so the training loader's own order is untouched)
        and restore the model's mode. Off under DDP (each rank would see other batches)."""
        n = int(self.config.bn_recalibration_batches)
        if n <= 0 or self._distributed:
            return
        from autoprune.evaluators import recalibrate_batchnorm

        was_training = self.model.training
        recalibrate_batchnorm(self.model, _calibration_batches(self.train_loader,
                                                               self.config.seed),
                              batches=n, device=self.device,
                              inputs_of=lambda b: split_batch(b)[0])  # the trainer's convention
        self.model.train(was_training)

    def _assemble(self) -> list[Callback]:
        built = callbacks_for(self.model, self.config,
                              has_metric=self.val_loader is not None or self.val_metric is not None)
        tail = [cb for cb in built if isinstance(cb, Checkpoint)]
        out = [cb for cb in built if not isinstance(cb, Checkpoint)] + self.extra_callbacks + tail
        ckpts = [i for i, cb in enumerate(out) if isinstance(cb, Checkpoint)]
        if len(ckpts) > 1 or (ckpts and ckpts[0] != len(out) - 1):
            raise InvalidInputError(
                "a Trainer takes one Checkpoint, as the last callback (it saves what the others "
                "recorded); give either config.checkpoint_dir or one Checkpoint at the end"
            )
        return out

    def _run_phase(self) -> None:
        state, cfg = self.state, self.config
        self.model.train()
        bar = None
        if cfg.progress and self.rank == 0 and state.step < self.total_steps:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps - state.step, desc=f"finetune ({state.phase})",
                       unit="step", leave=False)
        try:
            while state.step < self.total_steps and not state.stop_requested:
                epoch = state.epoch
                sampler = getattr(self.loader, "sampler", None)
                set_epoch = getattr(sampler, "set_epoch", None)
                if callable(set_epoch):
                    set_epoch(epoch)
                running, n = 0.0, 0
                for batch in self.loader:
                    if state.step >= self.total_steps:
                        break
                    loss = self._train_step(batch)
                    running, n = running + loss, n + 1
                    for cb in self.callbacks:
                        cb.on_step_end(self)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss:.3f}", epoch=epoch)
                if n == 0:
                    raise InvalidInputError(
                        f"train_loader yielded no batches in epoch {epoch}: give it data"
                    )
                self._end_epoch(epoch, running / n)
        finally:
            if bar is not None:
                bar.close()

    def _train_step(self, batch: Any) -> float:
        cfg, state, opt = self.config, self.state, self.optimizer
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _cosine(state.step, self.total_steps, cfg.warmup_steps)
        x, y = split_batch(batch)
        x, y = to_device(x, self.device), to_device(y, self.device)
        out = self.train_model(*x)
        if self.teacher is not None:
            with torch.no_grad():
                t_out = self.teacher(*x)
            loss = distillation_loss(out, t_out, y, temperature=cfg.kd_temperature,
                                     weight=cfg.kd_weight, loss_fn=self.loss_fn)
        else:
            loss = (self.loss_fn or F.cross_entropy)(out, y)
        if cfg.bn_l1 > 0:
            loss = loss + cfg.bn_l1 * bn_l1_penalty(self.model).to(loss.device)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise InvalidInputError(
                f"loss became {value} at step {state.step + 1}: lower lr (now {cfg.lr})"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state.step += 1
        return value

    def _metric(self) -> float | None:
        if self.val_metric is not None:
            return float(self.val_metric(self.model))
        if self.val_loader is not None:
            return evaluate_accuracy(self.model, self.val_loader, self.device)
        return None

    def _end_epoch(self, epoch: int, train_loss: float) -> None:
        state = self.state
        value = self._metric()
        self.model.train()
        state.history.append(EpochLog(
            phase=state.phase, epoch=epoch, step=state.step,
            lr=float(self.optimizer.param_groups[0]["lr"]), train_loss=train_loss,
            val_metric=value, masked_sparsity=masks.overall_sparsity(self.model),
        ))
        state.epoch = epoch + 1
        for cb in self.callbacks:
            cb.on_epoch_end(self)

    def _result(self) -> FinetuneResult:
        import pandas as pd

        stopper = next((cb for cb in self.callbacks if isinstance(cb, EarlyStopping)), None)
        history = pd.DataFrame([[getattr(r, c) for c in HISTORY_COLUMNS]
                                for r in self.state.history], columns=list(HISTORY_COLUMNS))
        return FinetuneResult(
            model=self.model,
            history=history,
            best_metric=stopper.best_metric if stopper is not None else None,
            best_step=stopper.best_step if stopper is not None else None,
            steps_run=self.state.step,
            resumed_from_step=self.resumed_from_step,
            stopped_early=self.state.stopped_early,
            final_sparsity=masks.overall_sparsity(self.model),
        )
