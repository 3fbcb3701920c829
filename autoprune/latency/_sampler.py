"""Plans to measure when fitting a latency model: spread over the whole range, in every kind
of plan the model will be asked about.

Kinds (``PLAN_KINDS``; recorded per measured plan, and the report is broken down by them):

* ``space`` — per-group keep ratios snapped to the device alignment, with other structures
  and removed blocks mixed in: what the search proposes;
* ``uniform_aligned`` — one keep ratio for every channel group, snapped to the alignment;
* ``uniform_unaligned`` — one keep ratio, widths not snapped: what other toolkits hand out,
  including plans that run *slower* than dense on devices with kernel rules;
* ``random_unaligned`` — per-group keep ratios around a shared level, not snapped.

Plans that price the same (same kept widths, structures and removed blocks) appear once.
"""

from __future__ import annotations

import math

import numpy as np

from autoprune.latency._featurize import CompiledSpec, plan_signature
from autoprune.plan import GroupPlan, PruningPlan
from autoprune.types import ModelSpec, Structure

PLAN_KINDS = ("space", "uniform_aligned", "uniform_unaligned", "random_unaligned")


class PlanSampler:
    """Random plans of ``spec`` (see the module docstring).

    ``alignment``: the device's width step. ``aligned_share``: share of plans snapped to it
    (three quarters of them ``space``, a quarter ``uniform_aligned``); the rest are split
    evenly between the two unaligned kinds. ``structures``: structures to draw (None: all a
    group allows). ``min_keep_ratio``, ``block_probability``: the range of the plans.
    ``group_step``: the device's per-group step of grouped convolutions (``KernelRules``);
    ``space`` plans keep those groups' per-group widths on it, as the search space does
    (``uniform_aligned`` plans snap to ``alignment`` only, like ``PruningPlan.uniform``).
    """

    def __init__(self, spec: ModelSpec, alignment: int, *, aligned_share: float = 0.6,
                 min_keep_ratio: float = 0.1, block_probability: float = 0.15,
                 structures: tuple[Structure | str, ...] | None = None,
                 group_step: int = 1) -> None:
        self.spec = spec
        self.group_step = max(1, int(group_step))
        self.alignment = max(1, int(alignment))
        self.aligned_share = float(aligned_share)
        self.min_keep_ratio = float(min_keep_ratio)
        self.block_probability = float(block_probability)
        self.structures = structures
        self._compiled = CompiledSpec(spec)

    def kind_weights(self) -> dict[str, float]:
        a = self.aligned_share
        return {"space": 0.75 * a, "uniform_aligned": 0.25 * a,
                "uniform_unaligned": 0.5 * (1 - a), "random_unaligned": 0.5 * (1 - a)}

    def sample(self, rng: np.random.Generator, n: int) -> list[tuple[str, PruningPlan]]:
        """``n`` (kind, plan) pairs: the dense plan first, then the mixture of kinds."""
        dense = PruningPlan.dense(self.spec)
        out: list[tuple[str, PruningPlan]] = [("dense", dense)]
        seen = {plan_signature(self._compiled, dense)}
        weights = self.kind_weights()
        kinds = [k for k, w in weights.items() if w > 0]
        probs = np.array([weights[k] for k in kinds])
        probs = probs / probs.sum()
        tries = 0
        while len(out) < n and tries < 50 * n:
            tries += 1
            kind = kinds[int(rng.choice(len(kinds), p=probs))]
            plan = self.plan_of_kind(kind, rng)
            sig = plan_signature(self._compiled, plan)
            if sig not in seen:
                seen.add(sig)
                out.append((kind, plan))
        return out

    def plan_of_kind(self, kind: str, rng: np.random.Generator) -> PruningPlan:
        if kind == "space":
            return self._snap_grouped(self.random_plan(rng, leveled=bool(rng.random() < 0.5),
                                                       align=self.alignment))
        if kind == "uniform_aligned":
            return self.uniform_plan(rng, self.alignment)
        if kind == "uniform_unaligned":
            return self.uniform_plan(rng, 1)
        if kind == "random_unaligned":
            return self.random_plan(rng, leveled=True, align=1, channel_only=True)
        raise ValueError(f"unknown plan kind {kind!r}; known: {PLAN_KINDS}")

    def _new_plan(self, align: int) -> PruningPlan:
        return PruningPlan(alignment=align, model_fingerprint=self.spec.fingerprint,
                           model_name=self.spec.model_name)

    def _snap_grouped(self, plan: PruningPlan) -> PruningPlan:
        """A snapped plan's grouped-conv groups on the per-group step (dense when the step is
        their whole per-group width)."""
        if plan.alignment <= 1 or self.group_step <= 1:
            return plan
        for name in list(plan.groups):
            g = self.spec.groups.get(name)
            if g is None or not self.spec.feeds_grouped_conv(name):
                continue
            if self.group_step >= g.units:
                del plan.groups[name]
            else:
                plan.alignments[name] = self.group_step
        return plan

    def uniform_plan(self, rng: np.random.Generator, align: int) -> PruningPlan:
        """One keep ratio for every channel group that allows channel pruning."""
        r = float(rng.uniform(self.min_keep_ratio, 1.0))
        plan = self._new_plan(align)
        for g in self.spec.groups.values():
            if g.kind == "channel" and Structure.CHANNEL in g.allowed:
                plan.groups[g.name] = GroupPlan(Structure.CHANNEL, r)
        return plan

    def random_plan(self, rng: np.random.Generator, leveled: bool, align: int,
                    channel_only: bool = False) -> PruningPlan:
        """Per channel group: ``channel`` with probability 0.6 (when allowed), else another
        allowed structure (``none`` included); keep ratios uniform in [min_keep_ratio, 1] or,
        when ``leveled``, spread around one level drawn for the whole plan."""
        spec = self.spec
        wanted = None if self.structures is None else {Structure(s) for s in self.structures}
        lo = self.min_keep_ratio
        level = rng.uniform(lo, 1.0)
        plan = self._new_plan(align)
        for g in spec.groups.values():
            allowed = [s for s in g.allowed
                       if wanted is None or s in wanted or s == Structure.NONE]
            if g.kind == "block":
                if not channel_only and Structure.BLOCK in allowed \
                        and rng.random() < self.block_probability:
                    plan.groups[g.name] = GroupPlan(Structure.BLOCK)
                continue
            others = [s for s in allowed if s not in (Structure.CHANNEL, Structure.BLOCK)]
            if channel_only:
                others = []
            if Structure.CHANNEL in allowed and (not others or rng.random() < 0.6):
                s = Structure.CHANNEL
            elif others:
                s = others[int(rng.integers(len(others)))]
            else:
                continue
            if s == Structure.NONE:
                continue
            if leveled:
                r = min(1.0, max(lo, level * math.exp(rng.normal(0.0, 0.2))))
            else:
                r = float(rng.uniform(lo, 1.0))
            plan.groups[g.name] = GroupPlan(s, float(r))
        return plan

    def neighbours(self, plan: PruningPlan, rng: np.random.Generator, n: int
                   ) -> list[PruningPlan]:
        """Plans near ``plan``: every channel/unstructured keep ratio jittered by ~±10%."""
        out = []
        for _ in range(n):
            p = PruningPlan.from_dict(plan.to_dict())
            for gp in p.groups.values():
                if gp.structure in (Structure.CHANNEL, Structure.UNSTRUCTURED):
                    r = gp.keep_ratio * math.exp(rng.normal(0.0, 0.1))
                    gp.keep_ratio = float(min(1.0, max(self.min_keep_ratio, r)))
            out.append(p)
        return out


__all__ = ["PLAN_KINDS", "PlanSampler"]
