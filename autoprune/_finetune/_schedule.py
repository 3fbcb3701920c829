"""Gradual pruning (Zhu & Gupta, 2017): reach per-layer target sparsities over training steps.

The sparsity at step t is ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3`` for
t0 <= t <= t1 (``cubic_sparsity``), reached by magnitude pruning every ``update_every`` steps
with the mask maths of ``autoprune.masks``: an unstructured target prunes
``pruned_count(numel, p * s_f)`` of the smallest weights; an ``(n, m)`` target prunes, within
every group of m consecutive input weights, ``round(p * (m - n))`` of the smallest (``nm_mask``
with ``n' = m - round(p * (m - n))``), where ``p`` is the share of the ramp done, so the last
update lands exactly on the n:m pattern and on the masks ``apply_plan`` would give.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autoprune import masks
from autoprune.errors import InvalidInputError

if TYPE_CHECKING:
    from autoprune.plan import PruningPlan
    from autoprune.types import ModelSpec

__all__ = ["GradualPruner", "GradualSchedule", "cubic_sparsity"]

Target = float | tuple[int, int]


def cubic_sparsity(step: int, final: float, start_step: int, end_step: int,
                   initial: float = 0.0) -> float:
    """Zhu & Gupta's cubic schedule: ``initial`` at ``start_step``, ``final`` from ``end_step`` on."""
    if step <= start_step:
        return initial
    if step >= end_step or end_step <= start_step:
        return final
    frac = (step - start_step) / (end_step - start_step)
    return final + (initial - final) * (1.0 - frac) ** 3


_SCHEDULE_KEYS = ("targets", "start_step", "end_step", "update_every", "initial_sparsity")


@dataclass
class GradualSchedule:
    """Reach per-layer target sparsities over training steps instead of in one shot.

    ``targets`` maps a module path to either a sparsity in [0, 1) (unstructured magnitude
    pruning) or an ``(n, m)`` pair (N:M pattern, e.g. ``(2, 4)``). ``None`` reads the targets
    from the model's existing ``weight_mask`` buffers (their current sparsity; a mask that is
    exactly 2:4 along the inputs becomes an ``(2, 4)`` target) and restarts them dense, which
    only recovers information if the masked weights still hold values (e.g. masks installed on
    a copy of the dense weights); prefer ``from_plan``. ``end_step=None`` ends the ramp at 75%
    of training; masks are updated every ``update_every`` steps and at ``end_step``.
    """

    targets: dict[str, Target] | None = None
    start_step: int = 0
    end_step: int | None = None
    update_every: int = 10
    initial_sparsity: float = 0.0

    def __post_init__(self) -> None:
        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.start_step) or self.start_step < 0:
            raise InvalidInputError(
                f"gradual start_step must be an int >= 0, got {self.start_step!r}"
            )
        if self.end_step is not None and (not is_int(self.end_step)
                                          or self.end_step <= self.start_step):
            raise InvalidInputError(
                f"gradual end_step must be an int > start_step ({self.start_step}) or None, "
                f"got {self.end_step!r}"
            )
        if not is_int(self.update_every) or self.update_every < 1:
            raise InvalidInputError(
                f"gradual update_every must be an int >= 1, got {self.update_every!r}"
            )
        if not 0.0 <= float(self.initial_sparsity) < 1.0:
            raise InvalidInputError(
                f"gradual initial_sparsity must be in [0, 1), got {self.initial_sparsity!r}"
            )
        if self.targets is not None and not isinstance(self.targets, Mapping):
            raise InvalidInputError(
                "gradual targets must be a dict {module path: sparsity or (n, m)} or None, got "
                f"{type(self.targets).__name__}"
            )

    @classmethod
    def from_plan(cls, plan: PruningPlan, spec: ModelSpec, **kwargs: Any) -> GradualSchedule:
        """Targets from the ``nm`` / ``unstructured`` groups of a plan (their producer layers)."""
        from autoprune.types import Structure

        targets: dict[str, Target] = {}
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
        """A ``GradualSchedule`` from itself, a dict of its fields, or ``None``."""
        if value is None or isinstance(value, GradualSchedule):
            return value
        if isinstance(value, Mapping):
            bad = set(value) - set(_SCHEDULE_KEYS)
            if bad:
                raise InvalidInputError(
                    f"unknown gradual schedule keys {sorted(bad)}; allowed: {sorted(_SCHEDULE_KEYS)}"
                )
            return cls(**dict(value))
        raise InvalidInputError(
            f"gradual must be a GradualSchedule or a dict, got {type(value).__name__}"
        )


def targets_from_masks(model: nn.Module) -> dict[str, Target]:
    """Module path -> target of every masked ``weight`` (exact 2:4 patterns become ``(2, 4)``)."""
    targets: dict[str, Target] = {}
    for path, mask in masks.get_masks(model).items():
        name, _, attr = path.rpartition(".")
        if attr != "weight":
            continue
        density = float(mask.float().mean())
        is_24 = mask.dim() >= 2 and abs(density - 0.5) < 1e-6 and masks.is_nm_mask(mask, 2, 4)
        targets[name] = (2, 4) if is_24 else 1.0 - density
    return targets


class GradualPruner:
    """Applies a ``GradualSchedule`` to a model step by step (``PruningCallback`` drives it)."""

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
            targets = targets_from_masks(model)
            for name in targets:
                with torch.no_grad():
                    modules[name].weight_mask.fill_(1.0)
        if not targets:
            raise InvalidInputError(
                "gradual pruning has no targets: pass GradualSchedule(targets={layer: sparsity}) "
                "or GradualSchedule.from_plan(plan, spec), or give a model with weight masks"
            )
        self.targets: dict[str, Target] = {}
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
        """Whether the masks are to be updated after ``step`` optimiser steps."""
        s = self.schedule
        if step < s.start_step or self.last_update >= self.end_step:
            return False
        return step >= self.end_step or (step - s.start_step) % s.update_every == 0

    @property
    def finished(self) -> bool:
        """True once the final masks are in place."""
        return self.last_update >= self.end_step

    @torch.no_grad()
    def update(self, step: int) -> None:
        p = self.progress(step)
        for name, target in self.targets.items():
            w = self.modules[name].weight.detach()
            if isinstance(target, tuple):
                n, m = target
                mask = masks.nm_mask(w.abs(), m - int(round(p * (m - n))), m)
            else:
                mask = masks.unstructured_mask(w.abs(), sparsity=p * target)
            masks.set_mask(self.model, f"{name}.weight" if name else "weight", mask)
        self.last_update = step
