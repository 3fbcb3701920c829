"""Callbacks: the pieces of fine-tuning, the same in ``Trainer`` and in your own loop.

``Trainer`` calls each hook of every callback in list order::

    on_train_begin                      once (a Checkpoint restores a saved run here)
    per phase ("train", then "rewind" when rewinding):
        on_phase_begin                  not called for the phase a resumed run continues
        per optimiser step: on_step_end
        per epoch:          on_epoch_end
        on_phase_end
    on_train_end                        once

In your own loop, call the hooks the callback documents with no trainer: ``on_train_begin()``
once, ``on_step_end()`` after every ``optimizer.step()`` (plain PyTorch, Lightning's
``on_train_batch_end``, ...). Each callback counts its own steps, and ``state_dict()`` /
``load_state_dict()`` carry its state through a ``Checkpoint``.

- ``MaskEnforcer(model)``: re-zeroes masked weights after every step.
- ``PruningCallback(model, gradual, total_steps)`` (also named ``GradualPruning``): a
  ``MaskEnforcer`` that also advances a ``GradualSchedule``.
- ``EarlyStopping(model, patience, restore_best)``: tracks the best validation metric (and its
  weights), stops after ``patience`` epochs without improvement, loads the best back at the end.
- ``Rewind(model, at_step)``: lottery-ticket rewinding; snapshots the weights at step k and,
  after training, resets the surviving weights to it (the final masks stay).
- ``Checkpoint(directory)``: ``Trainer`` only; writes the run atomically after every epoch and
  phase and resumes from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autoprune import masks
from autoprune._finetune._schedule import GradualPruner, GradualSchedule
from autoprune._finetune._state import TrainState
from autoprune.errors import CorruptFileError, InvalidInputError
from autoprune.io import atomic_torch_save, safe_torch_load

if TYPE_CHECKING:
    from autoprune._finetune._trainer import Trainer

__all__ = [
    "CHECKPOINT_NAME",
    "CHECKPOINT_VERSION",
    "Callback",
    "Checkpoint",
    "EarlyStopping",
    "GradualPruning",
    "MaskEnforcer",
    "PruningCallback",
    "Rewind",
]

CHECKPOINT_NAME = "finetune_last.pt"
CHECKPOINT_VERSION = 2


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def _state_to_cpu(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}


class Callback:
    """Base class: every hook does nothing; override the ones you need (see the module doc)."""

    def on_train_begin(self, trainer: Trainer | None = None) -> None:
        """Once, before the first step (after the model is on its device)."""

    def on_phase_begin(self, trainer: Trainer) -> None:
        """When a phase starts (``trainer.state.phase``)."""

    def on_step_end(self, trainer: Trainer | None = None) -> None:
        """After every optimiser step."""

    def on_epoch_end(self, trainer: Trainer | None = None) -> bool | None:
        """After every epoch (``trainer.state.history[-1]`` is its log). The trainer ignores
        what it returns (``EarlyStopping`` returns whether to stop, for loops of your own)."""

    def on_phase_end(self, trainer: Trainer) -> None:
        """When a phase ends (its steps ran out or a stop was requested)."""

    def on_train_end(self, trainer: Trainer | None = None) -> None:
        """Once, after the last phase."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this callback (plain data and tensors)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


class MaskEnforcer(Callback):
    """Re-zero masked weights after each optimiser step in your own loop.

    >>> enforcer = MaskEnforcer(model)
    >>> for x, y in loader:
    ...     loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
    ...     enforcer.on_step_end()

    Works with a DDP-wrapped model (it looks through ``.module``).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def on_train_begin(self, trainer: Trainer | None = None) -> None:
        masks.enforce(_unwrap(self.model))

    def on_step_end(self, trainer: Trainer | None = None) -> None:
        masks.enforce(_unwrap(self.model))

    def __call__(self) -> None:
        self.on_step_end()


class PruningCallback(MaskEnforcer):
    """``MaskEnforcer`` plus an optional gradual schedule; also named ``GradualPruning``.

    ``on_train_begin()`` installs the first masks, ``on_step_end()`` advances the schedule by
    one step and re-applies masks. ``total_steps`` sizes the default schedule end (75% of it;
    in a ``Trainer`` it defaults to the trainer's step count). The schedule only advances in
    the ``"train"`` phase: from a rewind on the masks are final. Lightning users call these from
    ``on_train_start`` / ``on_train_batch_end``.
    """

    def __init__(self, model: nn.Module, gradual: GradualSchedule | Mapping[str, Any] | None = None,
                 total_steps: int | None = None) -> None:
        super().__init__(model)
        self.gradual = GradualSchedule.coerce(gradual)
        self.total_steps = total_steps
        self.step = 0
        self.frozen = False
        self._pruner: GradualPruner | None = None

    def on_train_begin(self, trainer: Trainer | None = None) -> None:
        if self.gradual is not None:
            total = self.total_steps
            if total is None and trainer is not None:
                total = trainer.total_steps
            if total is None and self.gradual.end_step is None:
                raise InvalidInputError(
                    "PruningCallback with a gradual schedule needs total_steps or gradual.end_step"
                )
            self._pruner = GradualPruner(_unwrap(self.model), self.gradual,
                                         total or (self.gradual.end_step or 1))
            if self.step == 0 and self._pruner.due(0):
                self._pruner.update(0)
        super().on_train_begin(trainer)

    def on_phase_begin(self, trainer: Trainer) -> None:
        if trainer.state.phase != "train":
            self.frozen = True

    def on_step_end(self, trainer: Trainer | None = None) -> None:
        if self.gradual is not None and self._pruner is None:
            self.on_train_begin(trainer)
        self.step += 1
        if self._pruner is not None and not self.frozen and self._pruner.due(self.step):
            self._pruner.update(self.step)
        super().on_step_end(trainer)

    @property
    def masks_final(self) -> bool:
        """True when the schedule has no more mask updates to make (or there is none)."""
        return self._pruner is None or self.frozen or self._pruner.finished

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "frozen": self.frozen,
                "last_update": self._pruner.last_update if self._pruner is not None else -1}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.frozen = bool(state["frozen"])
        if self._pruner is not None:
            self._pruner.last_update = int(state["last_update"])


GradualPruning = PruningCallback


class EarlyStopping(Callback):
    """Track the best validation metric (higher is better), stop after ``patience`` epochs
    without improvement (``None``: never stop, only track), load the best weights back at the
    end when ``restore_best``.

    Epochs while a gradual schedule is still changing the masks are never kept as best (going
    back to them would undo pruning) and do not count towards patience; a later phase (the
    rewind) tracks its own best. In your own loop::

        stopper = EarlyStopping(model, patience=3)
        for epoch in range(epochs):
            train_one_epoch(...)
            if stopper.on_epoch_end(metric=accuracy(model), step=global_step):
                break
        stopper.on_train_end()  # best weights back
    """

    def __init__(self, model: nn.Module, patience: int | None = None,
                 restore_best: bool = True) -> None:
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int)
                                     or patience < 1):
            raise InvalidInputError(f"patience must be an int >= 1 or None, got {patience!r}")
        self.model = model
        self.patience = patience
        self.restore_best = restore_best
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.best_phase: str | None = None
        self.bad_epochs = 0
        self.best_state: dict[str, torch.Tensor] | None = None

    def on_phase_begin(self, trainer: Trainer) -> None:
        self.bad_epochs = 0

    def on_epoch_end(self, trainer: Trainer | None = None, *, metric: float | None = None,
                     step: int | None = None, phase: str = "train",
                     masks_final: bool = True) -> bool:
        """Record one epoch's metric; True when training should stop. With a trainer the
        metric, step, phase and mask state come from it."""
        if trainer is not None:
            log = trainer.state.history[-1]
            metric, step, phase = log.val_metric, log.step, log.phase
            masks_final = trainer.masks_final
        stop = self._update(metric, step, phase, masks_final)
        if stop and trainer is not None:
            trainer.request_stop()
        return stop

    def _update(self, value: float | None, step: int | None, phase: str, masks_final: bool) -> bool:
        if value is None or not masks_final:
            return False
        best = self.best_metric if self.best_phase == phase else None
        if best is None or value > best:
            self.best_metric, self.best_step, self.best_phase = float(value), step, phase
            self.best_state = _state_to_cpu(_unwrap(self.model).state_dict())
            self.bad_epochs = 0
            return False
        self.bad_epochs += 1
        return self.patience is not None and self.bad_epochs >= self.patience

    def on_train_end(self, trainer: Trainer | None = None) -> None:
        if self.restore_best and self.best_state is not None:
            model = _unwrap(self.model)
            model.load_state_dict(self.best_state)
            masks.enforce(model)

    def state_dict(self) -> dict[str, Any]:
        return {"best_metric": self.best_metric, "best_step": self.best_step,
                "best_phase": self.best_phase, "bad_epochs": self.bad_epochs,
                "best_state": self.best_state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_metric = state["best_metric"]
        self.best_step = state["best_step"]
        self.best_phase = state["best_phase"]
        self.bad_epochs = int(state["bad_epochs"])
        self.best_state = state["best_state"]


class Rewind(Callback):
    """Lottery-ticket rewinding: keep the weights (and BN statistics) of step ``at_step``;
    after training, reset the surviving weights to them, the final masks staying.

    In a ``Trainer`` this adds a ``"rewind"`` phase: the remaining ``total - at_step`` steps are
    trained again with the LR schedule replayed from ``at_step``. In your own loop call
    ``on_step_end()`` after every step and ``rewind()`` when training is done, then train again.
    """

    def __init__(self, model: nn.Module, at_step: int) -> None:
        if isinstance(at_step, bool) or not isinstance(at_step, int) or at_step < 0:
            raise InvalidInputError(f"rewind step must be an int >= 0, got {at_step!r}")
        self.model = model
        self.at_step = at_step
        self.step = 0
        self.rewound = False
        self.rewind_state: dict[str, torch.Tensor] | None = None

    def on_train_begin(self, trainer: Trainer | None = None) -> None:
        if trainer is not None:
            if self.at_step >= trainer.total_steps:
                raise InvalidInputError(
                    f"rewind step must be in [0, {trainer.total_steps}), got {self.at_step}"
                )
            trainer.add_phase("rewind")
        if self.at_step == 0 and self.step == 0 and self.rewind_state is None:
            self._snapshot()

    def on_step_end(self, trainer: Trainer | None = None) -> None:
        if self.rewound:
            return
        self.step += 1
        if self.step == self.at_step:
            self._snapshot()

    def on_phase_begin(self, trainer: Trainer) -> None:
        if trainer.state.phase == "rewind" and not self.rewound:
            self.rewind()
            trainer.state.step = self.at_step
            trainer.state.epoch = 0
            trainer.reset_optimizer()

    def _snapshot(self) -> None:
        self.rewind_state = _state_to_cpu(_unwrap(self.model).state_dict())

    @torch.no_grad()
    def rewind(self) -> None:
        """Reset the weights to the snapshot, keeping the current masks."""
        if self.rewind_state is None:
            raise InvalidInputError(
                f"nothing to rewind to: training never reached step {self.at_step} "
                f"({self.step} steps seen); call on_step_end() after every optimiser step"
            )
        model = _unwrap(self.model)
        final = {p: m.detach().clone() for p, m in masks.get_masks(model).items()}
        model.load_state_dict(self.rewind_state, strict=False)
        for path, mask in final.items():
            masks.set_mask(model, path, mask)
        masks.enforce(model)
        self.rewound = True

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "rewound": self.rewound, "rewind_state": self.rewind_state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.rewound = bool(state["rewound"])
        self.rewind_state = state["rewind_state"]


class Checkpoint(Callback):
    """Write the run to ``directory/finetune_last.pt`` (atomically, rank 0 only) after every
    epoch, at the end of every phase and after a phase change, and resume from it when it exists: weights and masks,
    optimiser, ``TrainState``, every callback's ``state_dict()``, the torch RNG and the train
    loader's own generator. It must be the last callback (it saves what the others recorded).
    Resuming expects the same model, data and options; a checkpoint that does not fit raises
    ``CorruptFileError`` naming the file.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    @property
    def path(self) -> Path:
        return self.directory / CHECKPOINT_NAME

    def on_train_begin(self, trainer: Trainer | None = None) -> None:
        if trainer is None:
            raise InvalidInputError("Checkpoint works inside a Trainer only (it saves the trainer)")
        if self.path.exists():
            self.load(trainer)

    def on_phase_begin(self, trainer: Trainer) -> None:
        if trainer.state.phase != trainer.phases[0]:  # a phase change (the rewind) is saved
            self.save(trainer)

    def on_epoch_end(self, trainer: Trainer | None = None) -> None:
        if trainer is not None:
            self.save(trainer)

    def on_phase_end(self, trainer: Trainer) -> None:
        self.save(trainer)

    def save(self, trainer: Trainer) -> None:
        if trainer.rank == 0:
            generator = getattr(trainer.loader, "generator", None)
            atomic_torch_save({
                "version": CHECKPOINT_VERSION,
                "model": _state_to_cpu(trainer.model.state_dict()),
                "optimizer": trainer.optimizer.state_dict(),
                "state": trainer.state.to_dict(),
                "callbacks": trainer.callback_states(),
                "rng": torch.get_rng_state(),
                "loader_rng": (generator.get_state() if isinstance(generator, torch.Generator)
                               else None),
            }, self.path)
        trainer.barrier()

    def load(self, trainer: Trainer) -> None:
        path = self.path
        ck = safe_torch_load(path)
        if not isinstance(ck, dict) or ck.get("version") != CHECKPOINT_VERSION:
            version = ck.get("version") if isinstance(ck, dict) else None
            raise CorruptFileError(f"{path}: checkpoint version {version!r} is not "
                                   f"{CHECKPOINT_VERSION}; delete it to start over")
        # masks first (buffers must exist before load_state_dict), then the weights
        try:
            masks.load_masked_state_dict(trainer.model, ck["model"])
            trainer.optimizer.load_state_dict(ck["optimizer"])
        except (RuntimeError, KeyError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CorruptFileError(
                f"{path}: checkpoint does not fit this model ({first}); it was written for "
                "another model or plan: use another checkpoint_dir or delete it to start over"
            ) from None
        try:
            state = TrainState.from_dict(ck["state"])
            trainer.load_callback_states(ck["callbacks"])
        except (InvalidInputError, KeyError, TypeError, ValueError) as e:
            raise CorruptFileError(
                f"{path}: checkpoint does not fit this run ({e}); it was written with other "
                "options: use another checkpoint_dir or delete it to start over"
            ) from None
        trainer.state = state
        torch.set_rng_state(ck["rng"])
        generator = getattr(trainer.loader, "generator", None)
        if isinstance(generator, torch.Generator) and ck.get("loader_rng") is not None:
            generator.set_state(ck["loader_rng"])
        trainer.resumed_from_step = state.step
