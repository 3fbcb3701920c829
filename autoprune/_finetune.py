"""Fine-tune a pruned model: masks kept, optional distillation, gradual pruning, rewinding.

``finetune(model, train_loader, ...)`` is a complete training loop for the common case; people
with their own loop (plain PyTorch, Lightning, ...) use ``PruningCallback`` (or the smaller
``MaskEnforcer``) and call ``on_step_end()`` after every ``optimizer.step()``.

What the loss is, exactly (``distillation_loss``)::

    CE   = loss_fn(student_logits, targets)                 # cross-entropy by default
    KL   = sum_c p_t(c) * (log p_t(c) - log p_s(c)),  averaged over the batch
           with p_t = softmax(teacher_logits / T), p_s = softmax(student_logits / T)
    loss = (1 - w) * CE + w * T**2 * KL                      # w = kd_weight, T = kd_temperature
    loss += bn_l1 * sum(|gamma|) over every BatchNorm layer  # network slimming, when bn_l1 > 0

Without a teacher the loss is ``CE`` (+ the BN-L1 term). The ``T**2`` factor keeps the
gradient scale of the soft term independent of ``T`` (Hinton et al., 2015).

Masks (``weight_mask`` buffers, see ``autoprune.masks``) of ``nm`` and ``unstructured`` layers
are re-applied after every optimiser step, so a pruned weight never comes back.

Gradual pruning (Zhu & Gupta, 2017): sparsity at step t is
``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3`` for t0 <= t <= t1, reached by
magnitude pruning every ``update_every`` steps; ``nm`` targets prune, within every group of m
consecutive input weights, ``round(s_t / s_f * (m - n))`` of the smallest, so the last update
lands exactly on the n:m pattern.

Under ``torchrun`` (``torch.distributed`` initialised) the model is wrapped in
``DistributedDataParallel``, a ``DataLoader`` over a map-style dataset is rebuilt with a
``DistributedSampler``, and only rank 0 writes checkpoints and shows progress.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from autoprune.errors import InvalidInputError

if TYPE_CHECKING:
    import pandas as pd

    from autoprune.plan import PruningPlan
    from autoprune.types import ModelSpec

OptimizerName = Literal["sgd", "adamw"]
CHECKPOINT_NAME = "finetune_last.pt"
CHECKPOINT_VERSION = 1

__all__ = [
    "FinetuneResult",
    "GradualSchedule",
    "MaskEnforcer",
    "PruningCallback",
    "cubic_sparsity",
    "distillation_loss",
    "evaluate_accuracy",
    "finetune",
]


# ---------------------------------------------------------------------------------------------
# masks (the buffer + pre-hook convention of autoprune.masks; local fallbacks keep this module
# usable on its own)
# ---------------------------------------------------------------------------------------------
def _masked_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every module whose ``weight`` carries a mask."""
    return [
        (name, m) for name, m in model.named_modules()
        if isinstance(getattr(m, "weight_mask", None), torch.Tensor)
    ]


def _weight_param(module: nn.Module) -> torch.Tensor:
    return module.weight


@torch.no_grad()
def _enforce_masks(model: nn.Module) -> int:
    """Zero every masked weight (``autoprune.masks.enforce``); returns how many are masked."""
    from autoprune import masks

    masks.enforce(model)
    return len(_masked_modules(model))


@torch.no_grad()
def _set_mask(root: nn.Module, module_path: str, mask: torch.Tensor) -> None:
    """Install or replace the mask of ``<module_path>.weight`` and zero the pruned weights."""
    from autoprune import masks

    masks.set_mask(root, f"{module_path}.weight" if module_path else "weight", mask)


def _sparsity_of(model: nn.Module) -> float:
    """Share of zeros over all masked weights (0.0 when nothing is masked)."""
    zeros = total = 0
    for _, m in _masked_modules(model):
        zeros += int((m.weight_mask == 0).sum())
        total += m.weight_mask.numel()
    return zeros / total if total else 0.0


def _nm_groups(w: torch.Tensor, m: int) -> torch.Tensor:
    """View a weight as (..., groups, m) with groups of m consecutive input weights.

    Conv weights (out, in, *k) are grouped along the input channels at each kernel position
    (the layout sparse tensor cores and ``masks.check_nm`` use).
    """
    if w.dim() == 2:
        out, cin = w.shape
        if cin % m:
            raise InvalidInputError(f"n:m with m={m} needs in_features divisible by {m}, got {cin}")
        return w.reshape(out, cin // m, m)
    out, cin = w.shape[:2]
    if cin % m:
        raise InvalidInputError(f"n:m with m={m} needs in_channels divisible by {m}, got {cin}")
    wk = w.reshape(out, cin, -1).permute(0, 2, 1)  # out, k, cin
    return wk.reshape(out, wk.shape[1], cin // m, m)


def _nm_mask(w: torch.Tensor, n_pruned: int, m: int) -> torch.Tensor:
    """Mask zeroing the ``n_pruned`` smallest-magnitude weights in each group of m inputs."""
    if n_pruned <= 0:
        return torch.ones_like(w)
    g = _nm_groups(w.abs(), m)
    idx = g.argsort(dim=-1)[..., :n_pruned]
    mg = torch.ones_like(g).scatter_(-1, idx, 0.0)
    if w.dim() == 2:
        return mg.reshape(w.shape)
    out, cin = w.shape[:2]
    k = mg.shape[1]
    return mg.reshape(out, k, cin).permute(0, 2, 1).reshape(w.shape)


def _magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Mask zeroing the ``round(sparsity * numel)`` smallest-magnitude weights (exactly)."""
    k = int(round(sparsity * w.numel()))
    if k <= 0:
        return torch.ones_like(w)
    flat = w.abs().flatten()
    idx = flat.argsort()[:k]
    mask = torch.ones_like(flat)
    mask[idx] = 0.0
    return mask.reshape(w.shape)


# ---------------------------------------------------------------------------------------------
# gradual pruning schedule
# ---------------------------------------------------------------------------------------------
def cubic_sparsity(step: int, final: float, start_step: int, end_step: int,
                   initial: float = 0.0) -> float:
    """Zhu & Gupta's cubic schedule: ``initial`` at ``start_step``, ``final`` from ``end_step`` on."""
    if step <= start_step:
        return initial
    if step >= end_step or end_step <= start_step:
        return final
    frac = (step - start_step) / (end_step - start_step)
    return final + (initial - final) * (1.0 - frac) ** 3


@dataclass
class GradualSchedule:
    """Reach per-layer target sparsities over training steps instead of in one shot.

    ``targets`` maps a module path to either a sparsity in [0, 1) (unstructured magnitude
    pruning) or an ``(n, m)`` pair (N:M pattern, e.g. ``(2, 4)``). ``None`` reads the targets
    from the model's existing ``weight_mask`` buffers (their current sparsity; a mask that is
    2:4 along the inputs becomes an ``(2, 4)`` target) and restarts them dense, which only
    recovers information if the masked weights still hold values (e.g. masks installed on a
    copy of the dense weights); prefer ``from_plan``. ``end_step=None`` ends the ramp at 75% of
    training; masks are updated every ``update_every`` steps and at ``end_step``.
    """

    targets: dict[str, float | tuple[int, int]] | None = None
    start_step: int = 0
    end_step: int | None = None
    update_every: int = 10
    initial_sparsity: float = 0.0

    @classmethod
    def from_plan(cls, plan: PruningPlan, spec: ModelSpec, **kwargs: Any) -> GradualSchedule:
        """Targets from the ``nm`` / ``unstructured`` groups of a plan (their producer layers)."""
        from autoprune.types import Structure

        targets: dict[str, float | tuple[int, int]] = {}
        for name, gp in plan.groups.items():
            group = spec.groups.get(name)
            if group is None:
                continue
            for layer in group.producers:
                if gp.structure == Structure.NM:
                    targets[layer] = (gp.n, gp.m)
                elif gp.structure == Structure.UNSTRUCTURED:
                    targets[layer] = 1.0 - gp.keep_ratio
        return cls(targets=targets, **kwargs)

    @classmethod
    def coerce(cls, value: GradualSchedule | Mapping[str, Any] | None) -> GradualSchedule | None:
        if value is None or isinstance(value, GradualSchedule):
            return value
        if isinstance(value, Mapping):
            known = {"targets", "start_step", "end_step", "update_every", "initial_sparsity"}
            bad = set(value) - known
            if bad:
                raise InvalidInputError(
                    f"unknown gradual schedule keys {sorted(bad)}; allowed: {sorted(known)}"
                )
            return cls(**dict(value))
        raise InvalidInputError(
            f"gradual must be a GradualSchedule or a dict, got {type(value).__name__}"
        )


class _GradualPruner:
    """Applies a ``GradualSchedule`` to a model step by step."""

    def __init__(self, model: nn.Module, schedule: GradualSchedule, total_steps: int) -> None:
        self.model = model
        self.schedule = schedule
        self.end_step = (
            schedule.end_step if schedule.end_step is not None
            else max(schedule.start_step + 1, int(0.75 * total_steps))
        )
        modules = dict(model.named_modules())
        targets = schedule.targets
        if targets is None:
            targets = _targets_from_masks(model)
            for name in targets:
                with torch.no_grad():
                    modules[name].weight_mask.fill_(1.0)
        if not targets:
            raise InvalidInputError(
                "gradual pruning has no targets: pass GradualSchedule(targets={layer: sparsity}) "
                "or GradualSchedule.from_plan(plan, spec), or give a model with weight masks"
            )
        self.targets: dict[str, float | tuple[int, int]] = {}
        for name, t in targets.items():
            if name not in modules or not isinstance(getattr(modules[name], "weight", None),
                                                     torch.Tensor):
                raise InvalidInputError(
                    f"gradual target {name!r} is not a module with a weight in this model"
                )
            if isinstance(t, (tuple, list)):
                n, m = int(t[0]), int(t[1])
                if not 0 < n < m:
                    raise InvalidInputError(f"gradual target {name!r}: need 0 < n < m, got {n}:{m}")
                _nm_groups(_weight_param(modules[name]), m)  # validates divisibility
                self.targets[name] = (n, m)
            else:
                s = float(t)
                if not 0.0 <= s < 1.0:
                    raise InvalidInputError(
                        f"gradual target {name!r}: sparsity must be in [0, 1), got {s}"
                    )
                self.targets[name] = s
        self.modules = {n: modules[n] for n in self.targets}
        self.last_update = -1

    def progress(self, step: int) -> float:
        """Share of the final sparsity reached at ``step`` (0..1, cubic)."""
        s = self.schedule
        return cubic_sparsity(step, 1.0, s.start_step, self.end_step, s.initial_sparsity)

    def due(self, step: int) -> bool:
        s = self.schedule
        if step < s.start_step or self.last_update >= self.end_step:
            return False
        return step >= self.end_step or (step - s.start_step) % max(1, s.update_every) == 0

    @torch.no_grad()
    def update(self, step: int) -> None:
        p = self.progress(step)
        for name, target in self.targets.items():
            module = self.modules[name]
            w = _weight_param(module)
            if isinstance(target, tuple):
                n, m = target
                mask = _nm_mask(w, int(round(p * (m - n))), m)
            else:
                mask = _magnitude_mask(w, p * target)
            _set_mask(self.model, name, mask)
        self.last_update = step

    def state(self) -> dict[str, Any]:
        return {"last_update": self.last_update}


def _targets_from_masks(model: nn.Module) -> dict[str, float | tuple[int, int]]:
    targets: dict[str, float | tuple[int, int]] = {}
    for name, m in _masked_modules(model):
        mask = m.weight_mask
        density = float(mask.float().mean())
        is_24 = False
        try:
            g = _nm_groups(mask.float(), 4)
            is_24 = bool(torch.all(g.sum(-1) == 2)) and abs(density - 0.5) < 1e-6
        except InvalidInputError:
            pass
        targets[name] = (2, 4) if is_24 else 1.0 - density
    return targets


# ---------------------------------------------------------------------------------------------
# loss and evaluation
# ---------------------------------------------------------------------------------------------
def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor | None,
    *,
    temperature: float = 4.0,
    weight: float = 0.5,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``(1 - w) * CE + w * T**2 * KL(softmax(t/T) || softmax(s/T))`` (KL averaged over the batch).

    With ``targets=None`` only the soft term is used (``w`` is treated as 1).
    """
    t = float(temperature)
    kl = F.kl_div(
        F.log_softmax(student_logits / t, dim=-1),
        F.log_softmax(teacher_logits.detach() / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    soft = (t * t) * kl
    if targets is None:
        return soft
    hard = (loss_fn or F.cross_entropy)(student_logits, targets)
    return (1.0 - weight) * hard + weight * soft


def _bn_l1(model: nn.Module) -> torch.Tensor:
    terms = [
        m.weight.abs().sum() for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None
    ]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def _split_batch(batch: Any) -> tuple[tuple[Any, ...], Any]:
    """(inputs as a tuple of positional args, targets) from a loader batch."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
    elif isinstance(batch, Mapping) and "inputs" in batch and "targets" in batch:
        x, y = batch["inputs"], batch["targets"]
    else:
        raise InvalidInputError(
            "each batch must be (inputs, targets) or {'inputs': ..., 'targets': ...}, got "
            f"{type(batch).__name__}"
        )
    return (tuple(x) if isinstance(x, (tuple, list)) else (x,)), y


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    return obj


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, loader: Iterable[Any], device: str | torch.device = "cpu",
                      max_batches: int | None = None) -> float:
    """Top-1 accuracy (0..1) of a classifier over ``(inputs, targets)`` batches."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct = total = 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = _split_batch(batch)
        out = model(*_to(x, device))
        correct += int((out.argmax(-1) == y.to(device)).sum())
        total += int(y.numel())
    model.train(was_training)
    if total == 0:
        raise InvalidInputError("evaluation loader yielded no samples")
    return correct / total


# ---------------------------------------------------------------------------------------------
# callbacks for people with their own training loop
# ---------------------------------------------------------------------------------------------
class MaskEnforcer:
    """Re-zero masked weights after each optimiser step in your own loop.

    >>> enforcer = MaskEnforcer(model)
    >>> for x, y in loader:
    ...     loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
    ...     enforcer.on_step_end()

    Works with a DDP-wrapped model (it looks through ``.module``).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def on_step_end(self) -> None:
        _enforce_masks(_unwrap(self.model))

    __call__ = on_step_end


class PruningCallback(MaskEnforcer):
    """``MaskEnforcer`` plus an optional gradual schedule, for your own loop.

    ``on_train_begin()`` installs the first masks, ``on_step_end()`` advances the schedule by one
    step and re-applies masks. ``total_steps`` sizes the default schedule end (75% of it).
    Lightning users call these from ``on_train_start`` / ``on_train_batch_end``.
    """

    def __init__(self, model: nn.Module, gradual: GradualSchedule | Mapping[str, Any] | None = None,
                 total_steps: int | None = None) -> None:
        super().__init__(model)
        self.gradual = GradualSchedule.coerce(gradual)
        self.total_steps = total_steps
        self.step = 0
        self._pruner: _GradualPruner | None = None

    def on_train_begin(self) -> None:
        if self.gradual is not None:
            if self.total_steps is None and self.gradual.end_step is None:
                raise InvalidInputError(
                    "PruningCallback with a gradual schedule needs total_steps or gradual.end_step"
                )
            self._pruner = _GradualPruner(_unwrap(self.model), self.gradual,
                                          self.total_steps or (self.gradual.end_step or 1))
            if self._pruner.due(0):
                self._pruner.update(0)
        _enforce_masks(_unwrap(self.model))

    def on_step_end(self) -> None:
        if self.gradual is not None and self._pruner is None:
            self.on_train_begin()
        self.step += 1
        if self._pruner is not None and self._pruner.due(self.step):
            self._pruner.update(self.step)
        _enforce_masks(_unwrap(self.model))

    __call__ = on_step_end


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


# ---------------------------------------------------------------------------------------------
# the training loop
# ---------------------------------------------------------------------------------------------
@dataclass
class FinetuneResult:
    """What ``finetune`` returns. ``history`` has one row per logged step / epoch."""

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
    sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=rank,
                                 shuffle=shuffle, seed=seed)
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=sampler,
        num_workers=loader.num_workers, collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory, drop_last=loader.drop_last,
    )


def _make_optimizer(params: Iterable[torch.nn.Parameter], name: str, lr: float,
                    weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise InvalidInputError(f"unknown optimizer {name!r}; allowed: sgd, adamw")


def _cosine(step: int, total: int, warmup: int = 0) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))


def _state_to_cpu(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}


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
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> FinetuneResult:
    """Train ``model`` in place (masks kept) and return a ``FinetuneResult``.

    - ``epochs`` passes over ``train_loader``, or exactly ``steps`` optimiser steps if given.
    - Learning rate: cosine decay from ``lr`` to 0 over all steps (optional linear warm-up).
    - ``teacher``: the dense model; adds distillation (see the module docstring for the formula).
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
    """
    if epochs < 1 and steps is None:
        raise InvalidInputError(f"epochs must be >= 1, got {epochs}")
    if steps is not None and steps < 1:
        raise InvalidInputError(f"steps must be >= 1, got {steps}")
    if lr <= 0:
        raise InvalidInputError(f"lr must be > 0, got {lr}")
    if not 0.0 <= kd_weight <= 1.0:
        raise InvalidInputError(f"kd_weight must be in [0, 1], got {kd_weight}")
    if kd_temperature <= 0:
        raise InvalidInputError(f"kd_temperature must be > 0, got {kd_temperature}")
    if bn_l1 < 0:
        raise InvalidInputError(f"bn_l1 must be >= 0, got {bn_l1}")
    if optimizer not in ("sgd", "adamw"):
        raise InvalidInputError(f"unknown optimizer {optimizer!r}; allowed: sgd, adamw")
    if early_stopping_patience is not None and val_loader is None and val_metric is None:
        raise InvalidInputError("early_stopping_patience needs val_loader or val_metric")
    schedule = GradualSchedule.coerce(gradual)

    import pandas as pd

    dev = torch.device(device)
    distributed, rank, world = _dist()
    torch.manual_seed(seed)
    model.to(dev)
    if teacher is not None:
        teacher.to(dev).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    loader = _distributed_loader(train_loader, world, rank, seed) if distributed else train_loader
    try:
        steps_per_epoch = len(loader)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = None
    if steps is None and not steps_per_epoch:
        raise InvalidInputError("train_loader has no length: pass steps= explicitly")
    total_steps = steps if steps is not None else epochs * int(steps_per_epoch or 0)
    if rewind is not None and not 0 <= rewind < total_steps:
        raise InvalidInputError(f"rewind step must be in [0, {total_steps}), got {rewind}")

    base = model
    pruner = _GradualPruner(base, schedule, total_steps) if schedule is not None else None
    _enforce_masks(base)

    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    train_model: nn.Module = base
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(base, device_ids=[dev.index] if dev.type == "cuda" else None)

    def metric() -> float | None:
        if val_metric is not None:
            return float(val_metric(base))
        if val_loader is not None:
            return evaluate_accuracy(base, val_loader, dev)
        return None

    rows: list[dict[str, Any]] = []
    state: dict[str, Any] = {
        "phase": "train", "step": 0, "epoch": 0, "best_metric": None, "best_step": None,
        "bad_epochs": 0, "best_state": None, "rewind_state": None, "stopped_early": False,
        "done": False, "best_phase": None,
    }
    resumed_from: int | None = None

    # optimiser / phases ------------------------------------------------------------------
    phases = ["train"] + (["rewind"] if rewind is not None else [])

    def new_optimizer() -> torch.optim.Optimizer:
        return _make_optimizer([p for p in base.parameters() if p.requires_grad], optimizer, lr,
                               weight_decay, momentum)

    opt = new_optimizer()

    if ckpt_path is not None and ckpt_path.exists():
        from autoprune.io import safe_torch_load

        ck = safe_torch_load(ckpt_path)
        if ck.get("version") != CHECKPOINT_VERSION:
            from autoprune.errors import CorruptFileError

            raise CorruptFileError(f"{ckpt_path}: checkpoint version {ck.get('version')!r} "
                                   f"is not {CHECKPOINT_VERSION}; delete it to start over")
        # masks first (buffers must exist before load_state_dict), then the weights
        from autoprune.masks import load_masked_state_dict

        try:
            load_masked_state_dict(base, ck["model"])
            opt.load_state_dict(ck["optimizer"])
        except (RuntimeError, KeyError, ValueError) as e:
            from autoprune.errors import CorruptFileError

            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CorruptFileError(
                f"{ckpt_path}: checkpoint does not fit this model ({first}); it was written for "
                "another model or plan: use another checkpoint_dir or delete it to start over"
            ) from None
        for k in ("phase", "step", "epoch", "best_metric", "best_step", "bad_epochs",
                  "best_state", "rewind_state", "stopped_early", "done", "best_phase"):
            state[k] = ck["state"].get(k, state[k])
        rows = list(ck.get("history", []))
        if pruner is not None:
            pruner.last_update = int(ck["state"].get("pruner_last_update", -1))
        if "rng" in ck:
            torch.set_rng_state(ck["rng"])
        resumed_from = int(state["step"])

    def save_checkpoint() -> None:
        if ckpt_path is None or rank != 0:
            return
        from autoprune.io import atomic_torch_save

        atomic_torch_save({
            "version": CHECKPOINT_VERSION,
            "model": _state_to_cpu(base.state_dict()),
            "optimizer": opt.state_dict(),
            "state": {**state, "pruner_last_update": pruner.last_update if pruner else -1},
            "history": rows,
            "rng": torch.get_rng_state(),
        }, ckpt_path)

    def barrier() -> None:
        if distributed:
            import torch.distributed as dist

            dist.barrier()

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        n_bar = total_steps + (total_steps - (rewind or 0) if rewind is not None else 0)
        bar = tqdm(total=n_bar, desc="finetune", unit="step", leave=False)
        done_before = state["step"] + (total_steps if state["phase"] == "rewind" else 0)
        bar.update(min(done_before, n_bar))

    def batches() -> Iterator[Any]:
        epoch = int(state["epoch"])
        while True:
            sampler = getattr(loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            yield from ((epoch, b) for b in loader)
            epoch += 1

    for phase in phases[phases.index(state["phase"]):]:
        if state["done"]:
            break
        if phase == "rewind" and state["phase"] == "train":
            # reset surviving weights to step k; the final masks stay (masks are buffers)
            masks_now = {n: m.weight_mask.detach().clone() for n, m in _masked_modules(base)}
            base.load_state_dict(state["rewind_state"], strict=False)
            for n, m in _masked_modules(base):
                m.weight_mask.copy_(masks_now[n])
            _enforce_masks(base)
            state.update(phase="rewind", step=int(rewind or 0), epoch=0, bad_epochs=0)
            opt = new_optimizer()
            pruner = None  # masks are final now
            save_checkpoint()
        elif phase == "rewind":
            pruner = None

        if pruner is not None and state["step"] == 0 and pruner.due(0):
            pruner.update(0)
        if rewind == 0 and phase == "train" and state["rewind_state"] is None:
            state["rewind_state"] = _state_to_cpu(base.state_dict())

        base.train()
        running = 0.0
        n_running = 0
        epoch_seen = int(state["epoch"])
        stop = False
        it = batches()
        # skip the batches of a partly finished epoch is not needed: checkpoints are per epoch
        while int(state["step"]) < total_steps and not stop:
            epoch, batch = next(it)
            if epoch != epoch_seen:
                stop = _end_epoch(state, rows, epoch_seen, running / max(1, n_running), opt,
                                  metric, base, early_stopping_patience, phase,
                                  _masks_final(pruner))
                state["epoch"] = epoch
                save_checkpoint()
                barrier()
                epoch_seen, running, n_running = epoch, 0.0, 0
                if stop:
                    break
            step = int(state["step"])
            for g in opt.param_groups:
                g["lr"] = lr * _cosine(step, total_steps, warmup_steps)
            x, y = _split_batch(batch)
            x, y = _to(x, dev), _to(y, dev)
            out = train_model(*x)
            if teacher is not None:
                with torch.no_grad():
                    t_out = teacher(*x)
                loss = distillation_loss(out, t_out, y, temperature=kd_temperature,
                                         weight=kd_weight, loss_fn=loss_fn)
            else:
                loss = (loss_fn or F.cross_entropy)(out, y)
            if bn_l1 > 0:
                loss = loss + bn_l1 * _bn_l1(base).to(loss.device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            state["step"] = step
            if pruner is not None and pruner.due(step):
                pruner.update(step)
            _enforce_masks(base)
            if phase == "train" and rewind is not None and step == rewind:
                state["rewind_state"] = _state_to_cpu(base.state_dict())
            if not torch.isfinite(loss):
                raise InvalidInputError(
                    f"loss became {float(loss)} at step {step}: lower lr (now {lr})"
                )
            running += float(loss.detach())
            n_running += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", epoch=epoch)
        if not stop and n_running > 0:
            stop = _end_epoch(state, rows, epoch_seen, running / n_running, opt, metric, base,
                              early_stopping_patience, phase, _masks_final(pruner))
        state["stopped_early"] = bool(state["stopped_early"] or stop)
        if phase == phases[-1]:
            state["done"] = True
        save_checkpoint()
        barrier()
        if stop and phase == "train" and rewind is not None:
            continue  # early stop ends this phase; rewinding still happens

    if bar is not None:
        bar.close()
    if restore_best and state["best_state"] is not None:
        base.load_state_dict(state["best_state"])
        _enforce_masks(base)
    history = pd.DataFrame(rows, columns=["phase", "epoch", "step", "lr", "train_loss",
                                          "val_metric", "masked_sparsity"])
    return FinetuneResult(
        model=base,
        history=history,
        best_metric=state["best_metric"],
        best_step=state["best_step"],
        steps_run=int(state["step"]),
        resumed_from_step=resumed_from,
        stopped_early=bool(state["stopped_early"]),
        final_sparsity=_sparsity_of(base),
    )


def _masks_final(pruner: _GradualPruner | None) -> bool:
    return pruner is None or pruner.last_update >= pruner.end_step


def _end_epoch(state: dict[str, Any], rows: list[dict[str, Any]], epoch: int, train_loss: float,
               opt: torch.optim.Optimizer, metric: Callable[[], float | None], base: nn.Module,
               patience: int | None, phase: str, masks_final: bool = True) -> bool:
    """Log one epoch, track the best metric; True when early stopping says stop.

    While a gradual schedule is still ramping, epochs are logged but never kept as "best"
    (restoring them would undo pruning) and do not count towards early stopping.
    """
    value = metric()
    rows.append({
        "phase": phase, "epoch": epoch, "step": int(state["step"]),
        "lr": float(opt.param_groups[0]["lr"]), "train_loss": train_loss,
        "val_metric": value, "masked_sparsity": _sparsity_of(base),
    })
    if value is None or not masks_final:
        return False
    # in the rewind phase only rewound weights count as "best" (the masks are final there)
    best = state["best_metric"]
    if phase == "rewind" and state.get("best_phase") != "rewind":
        best = None
    if best is None or value > best:
        state["best_metric"], state["best_step"] = value, int(state["step"])
        state["best_state"] = _state_to_cpu(base.state_dict())
        state["best_phase"] = phase
        state["bad_epochs"] = 0
        return False
    state["bad_epochs"] = int(state["bad_epochs"]) + 1
    return patience is not None and state["bad_epochs"] >= patience
