"""``repair``: the nearest plan on the device's fast widths, built from the pruned model's own
weights and measured on the device before it is returned."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from autoprune._diagnose._context import Context, build_context
from autoprune._diagnose._match import match_channels
from autoprune._diagnose._rebuild import choose_indices, graft
from autoprune._diagnose._report import mask_notes
from autoprune.errors import InvalidInputError
from autoprune.plan import GroupPlan, PruningPlan
from autoprune.types import Structure

if TYPE_CHECKING:
    import pandas as pd

    from autoprune.latency._table import LatencyTable


@dataclass
class RepairResult:
    """What ``repair`` returns. ``model`` is the repaired model, or the input itself when no
    candidate measured faster (``changed`` False). Latencies are measured on the device:
    ``input_latency_ms`` / ``dense_latency_ms`` interleaved, ``repaired_latency_ms`` as the
    input's time times the paired median ratio repaired / input (``ratio_iqr`` its spread).
    ``groups``: per group, units in the reference, the pruned model and the repair.
    ``candidates``: every plan measured (widths by MACs, table and measured latency)."""

    model: nn.Module
    plan: PruningPlan
    changed: bool
    input_latency_ms: float
    repaired_latency_ms: float
    dense_latency_ms: float
    ratio_to_input: float
    ratio_iqr: float
    groups: pd.DataFrame
    candidates: pd.DataFrame
    rebuilt_from_reference: bool = False
    budget_ms: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def speedup_vs_input(self) -> float:
        return self.input_latency_ms / self.repaired_latency_ms

    @property
    def speedup_vs_dense(self) -> float:
        return self.dense_latency_ms / self.repaired_latency_ms

    def __str__(self) -> str:
        head = (f"repair: input {self.input_latency_ms:.4g} ms -> repaired "
                f"{self.repaired_latency_ms:.4g} ms ({self.speedup_vs_input:.3f}x faster; "
                f"dense {self.dense_latency_ms:.4g} ms, {self.speedup_vs_dense:.3f}x)")
        changed = self.groups[self.groups["change"] != 0]
        body = changed.to_string(index=False) if len(changed) else "(no group changed)"
        return "\n".join([head, *self.notes, "", body])

    def _repr_html_(self) -> str:
        import html

        head = "<br>".join(html.escape(x) for x in str(self).splitlines()[:1] + self.notes)
        return f"<div><p>{head}</p>{self.groups.to_html(index=False)}</div>"


def _members(ctx: Context) -> dict[str, list[str]]:
    """Group -> the layers whose widths it changes."""
    out: dict[str, list[str]] = {}
    for name, lay in ctx.spec.layers.items():
        for g in {g for g, _ in (*lay.in_segments, *lay.out_segments) if g is not None}:
            out.setdefault(g, []).append(name)
    return out


def _plan_of(ctx: Context, widths: dict[str, int]) -> PruningPlan:
    plan = PruningPlan.dense(ctx.spec)
    for name, k in widths.items():
        if k < ctx.spec.groups[name].units:
            plan.groups[name] = GroupPlan(Structure.CHANNEL, k / ctx.spec.groups[name].units)
    return plan


class _Pricer:
    """Table latency of per-group widths, updated one group at a time."""

    def __init__(self, ctx: Context, widths: dict[str, int]) -> None:
        self.ctx, self.widths = ctx, dict(widths)
        self.members = _members(ctx)
        self.cost = self._layer_costs(self.widths, list(ctx.spec.layers))

    def _layer_costs(self, widths: dict[str, int], names: list[str]) -> dict[str, float]:
        plan = _plan_of(self.ctx, widths)
        want = set(names)
        return {p.name: self.ctx.price(p.spec, p.structure, p.density)
                for p in self.ctx.spec.pruned_layers(plan) if p.name in want}

    @property
    def total(self) -> float:
        return sum(self.cost.values())

    def total_if(self, group: str, k: int) -> float:
        trial = {**self.widths, group: k}
        names = self.members.get(group, [])
        new = self._layer_costs(trial, names)
        return self.total - sum(self.cost[n] for n in names) + sum(new.values())

    def set(self, group: str, k: int) -> None:
        self.widths[group] = k
        self.cost.update(self._layer_costs(self.widths, self.members.get(group, [])))


def rounding_choices(ctx: Context) -> dict[str, tuple[int, int]]:
    """Per group whose width is off the device's step: (rounded down, rounded up). A grouped
    conv's group (its units are per-group widths) rounds to the rules' per-group step; where
    no multiple of it lies below, both choices are the next multiple up (or the full width)."""
    a = ctx.rules.alignment
    gs = ctx.rules.group_step
    out: dict[str, tuple[int, int]] = {}
    for name, k in ctx.kept.items():
        g = ctx.spec.groups[name]
        if k >= g.units:
            continue
        if g.unit_size != 1:
            if gs > 1 and k % gs != 0 and ctx.spec.feeds_grouped_conv(name):
                up = min(-(-k // gs) * gs, g.units)
                out[name] = (max((k // gs) * gs, g.min_units) if k >= gs else up, up)
            continue
        if a <= 1 or g.units <= a or k % a == 0:
            continue
        down = max(a, (k // a) * a, g.min_units)
        up = min(-(-k // a) * a, g.units)
        out[name] = (down, up)
    return out


def candidate_widths(ctx: Context, target_ms: float) -> list[dict[str, int]]:
    """Plans to measure: greedy from every group rounded up, rounding down the group that
    saves most table latency per channel lost until the table total is at most
    ``target_ms`` (and 5% below it); plus all-up and all-down. Widest first."""
    choices = rounding_choices(ctx)
    if not choices:
        return []
    up = {**ctx.kept, **{n: u for n, (_, u) in choices.items()}}
    down = {**ctx.kept, **{n: d for n, (d, _) in choices.items()}}
    # the table misses whole-model effects: a second, 5% tighter greedy plan gives the
    # measurement a margin to choose from
    greedy = [_greedy(ctx, choices, up, t) for t in (target_ms, 0.95 * target_ms)]
    seen: list[dict[str, int]] = []
    for w in (up, *greedy, down):
        if w not in seen:
            seen.append(w)
    return seen


def _greedy(ctx: Context, choices: dict[str, tuple[int, int]], up: dict[str, int],
            target_ms: float) -> dict[str, int]:
    pricer = _Pricer(ctx, up)
    open_groups = [n for n, (d, u) in choices.items() if d < u]
    while pricer.total > target_ms and open_groups:
        best, best_gain, best_total = None, -math.inf, math.inf
        for n in open_groups:
            d, u = choices[n]
            t = pricer.total_if(n, d)
            gain = (pricer.total - t) / max(1, u - d)
            if gain > best_gain:
                best, best_gain, best_total = n, gain, t
        if best is None or best_total >= pricer.total:
            break
        pricer.set(best, choices[best][0])
        open_groups.remove(best)
    return dict(pricer.widths)


def repair(pruned: nn.Module, reference: nn.Module, example_inputs: Any,
           device: Any = "onnxruntime-cpu", latency_budget_ms: float | None = None,
           table: LatencyTable | None = None) -> RepairResult:
    """The nearest plan to ``pruned`` on ``device``'s fast widths, applied to the pruned
    model's own weights and measured against it before it is returned.

    Each channel group is rounded down or up to the device's kernel-rule step. With
    ``latency_budget_ms``: the widest candidate measured within it (none within it: the
    fastest one measured faster than ``pruned``, said in ``notes``); without: the widest
    measured faster than ``pruned``. Groups keep the pruned model's surviving channels; a
    group that grows takes the reference channels ``pruned`` dropped, by L1 magnitude. If the
    pruned model's channels cannot be matched to the reference's (it was fine-tuned after
    pruning), the candidates are rebuilt from the reference with ``apply_plan`` (said in
    ``notes``). Never returns a model measured slower than ``pruned``: if no candidate is
    faster the input comes back unchanged (``changed`` False)."""
    if latency_budget_ms is not None and (
            isinstance(latency_budget_ms, bool) or not isinstance(latency_budget_ms, (int, float))
            or not math.isfinite(latency_budget_ms) or latency_budget_ms <= 0):
        raise InvalidInputError(
            f"latency_budget_ms={latency_budget_ms!r}; pass a positive number of milliseconds "
            "or None (no slower than the pruned model)")
    import pandas as pd

    from autoprune.executor import apply_plan

    ctx = build_context(pruned, reference, example_inputs, device, table)
    notes: list[str] = []
    dense_s, input_s = ctx.backend.measure_interleaved([reference, ctx.runnable], ctx.inputs)
    dense_ms, input_ms = float(dense_s.median_ms), float(input_s.median_ms)
    pruned_table_ms = ctx.predict(ctx.plan)
    if latency_budget_ms is None:
        target = pruned_table_ms
    else:  # the budget in table units: the table total scaled as the measurement runs
        target = float(latency_budget_ms) * pruned_table_ms / max(input_ms, 1e-12)
    cands = candidate_widths(ctx, target)
    notes.extend(mask_notes(ctx))
    if not cands:
        notes.append("every group is already on the device's fast widths "
                     f"({ctx.rules}); nothing to round")
    idx, why = match_channels(ctx.runnable, reference, ctx.spec, ctx.kept) if cands else ({}, "")
    rebuilt = bool(cands) and not idx
    if rebuilt:
        notes.append(f"the pruned model's channels could not be matched to the reference's "
                     f"({why}): candidates were rebuilt from the reference with apply_plan "
                     "(l1), not from the pruned model's weights")
    rows = []
    best: tuple[float, float, nn.Module, dict[str, int]] | None = None
    faster: list[tuple[float, float, nn.Module, dict[str, int]]] = []
    for widths in cands:
        plan = _plan_of(ctx, widths)
        model: nn.Module | None = None
        if idx:
            model = graft(ctx.runnable, reference, ctx.spec, ctx.inputs, idx,
                          choose_indices(ctx.runnable, reference, ctx.spec, idx, widths))
            if model is None and not rebuilt:
                rebuilt = True
                notes.append("the pruned model's tensors do not have the shapes its channels "
                             "imply: candidates were rebuilt from the reference with "
                             "apply_plan (l1)")
        if model is None:
            model = apply_plan(reference, plan, ctx.inputs, importance="l1", spec=ctx.spec)
        ratio, iqr = ctx.backend.measure_ratio(model, ctx.runnable, ctx.inputs)
        ms = float(ratio) * input_ms
        macs = ctx.spec.count(plan)[0]
        ok = ratio < 1.0 and (latency_budget_ms is None or ms <= latency_budget_ms)
        rows.append({"macs": macs, "table_latency_ms": ctx.predict(plan),
                     "measured_latency_ms": ms, "ratio_to_input": float(ratio),
                     "ratio_iqr": float(iqr), "accepted": ok})
        if ok and (best is None or macs > best[1]):
            best = (float(ratio), macs, model, widths)
        if ratio < 1.0:
            faster.append((float(ratio), macs, model, widths))
        model.train(pruned.training)
    candidates = pd.DataFrame(rows, columns=["macs", "table_latency_ms", "measured_latency_ms",
                                             "ratio_to_input", "ratio_iqr", "accepted"])
    if best is None and latency_budget_ms is not None and faster:
        best = min(faster, key=lambda c: c[0])
        notes.append(f"no candidate meets the budget {latency_budget_ms:.4g} ms (rounding to "
                     f"the fast widths cannot go further; autoprune.search can): returned the "
                     f"fastest one, {best[0] * input_ms:.4g} ms, still faster than the input")
    final_widths = best[3] if best is not None else dict(ctx.kept)
    groups = pd.DataFrame(
        [{"group": n, "units": ctx.spec.groups[n].units, "pruned_units": k,
          "repaired_units": final_widths[n], "change": final_widths[n] - k}
         for n, k in ctx.kept.items()],
        columns=["group", "units", "pruned_units", "repaired_units", "change"])
    if best is None:
        if cands:
            notes.append("no candidate measured faster than the input: returned unchanged")
        return RepairResult(pruned, ctx.plan, False, input_ms, input_ms, dense_ms, 1.0, 0.0,
                            groups, candidates, rebuilt, latency_budget_ms, notes)
    ratio = best[0]
    iqr = float(candidates.loc[candidates["ratio_to_input"] == ratio, "ratio_iqr"].iloc[0])
    return RepairResult(best[2], _plan_of(ctx, best[3]), True, input_ms, ratio * input_ms,
                        dense_ms, ratio, iqr, groups, candidates, rebuilt, latency_budget_ms,
                        notes)
