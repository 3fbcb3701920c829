"""Plans → arrays → per-layer widths → features: how a plan is priced without a model.

``CompiledSpec`` turns a ``ModelSpec`` into index arrays; ``encode`` turns plans into kept
units per group, ``layer_arrays`` into per-layer (in, out) widths, structures and presence.
``PlanFeaturizer`` looks each distinct (layer, widths, structure) up in the latency table once
(cached) and builds the features the regressors see.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from autoprune.errors import InvalidInputError, InvalidPlanError
from autoprune.plan import GroupPlan, PruningPlan
from autoprune.types import LayerSpec, ModelSpec, OpKind, Structure

_STRUCT_CODE = {Structure.NONE: 0, Structure.CHANNEL: 1, Structure.NM: 2,
                Structure.UNSTRUCTURED: 3, Structure.BLOCK: 4}
_CODE_STRUCT = {v: k for k, v in _STRUCT_CODE.items()}


@dataclass
class EncodedPlans:
    kept: np.ndarray  # [P, G] kept units per channel group
    struct: np.ndarray  # [P, G] structure code per channel group
    density: np.ndarray  # [P, G] kept weight share (nm / unstructured)
    removed: np.ndarray  # [P, B] block removed


class CompiledSpec:
    """A ``ModelSpec`` turned into index arrays that price many plans at once."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.fingerprint = spec.fingerprint  # a hash over every layer: compute it once
        chan = [g for g in spec.groups.values() if g.kind == "channel"]
        self.group_names = [g.name for g in chan]
        self.group_index = {n: i for i, n in enumerate(self.group_names)}
        self.units = np.array([g.units for g in chan], dtype=np.int64)
        self.min_units = np.array([g.min_units for g in chan], dtype=np.int64)
        self.block_names = [g.name for g in spec.groups.values() if g.kind == "block"]
        self.block_index = {n: i for i, n in enumerate(self.block_names)}
        self.layer_names = list(spec.layers)
        self.layer_specs: list[LayerSpec] = [lay.spec for lay in spec.layers.values()]
        self.ops: list[OpKind] = [s.op for s in self.layer_specs]

        def segs(segments: tuple[tuple[str | None, int], ...]) -> list[tuple[int, int]]:
            return [(self.group_index.get(g, -1) if g is not None else -1, int(c))
                    for g, c in segments]

        self.in_segs = [segs(lay.in_segments) for lay in spec.layers.values()]
        self.out_segs = [segs(lay.out_segments) for lay in spec.layers.values()]
        self.layer_block = np.array(
            [self.block_index.get(lay.block, -1) if lay.block is not None else -1
             for lay in spec.layers.values()], dtype=np.int64)
        # layer -> channel-group indices whose nm/unstructured masks land on its weights
        mask_groups: dict[str, list[int]] = {}
        for g in spec.groups.values():
            if g.name in self.group_index:
                for p in g.producers:
                    mask_groups.setdefault(p, []).append(self.group_index[g.name])
        self.mask_groups = [mask_groups.get(n, []) for n in self.layer_names]

    # -- plans -> arrays ------------------------------------------------------------------
    def encode(self, plans: Sequence[PruningPlan]) -> EncodedPlans:
        n_p, n_g, n_b = len(plans), len(self.group_names), len(self.block_names)
        fp = self.fingerprint
        gindex, bindex = self.group_index, self.block_index
        aligns: list[int] = []
        owner: list[int] = []  # plan index of each (group name, GroupPlan) below
        names: list[str] = []
        gps: list[GroupPlan] = []
        ai: list[int] = []
        aj: list[int] = []
        av: list[int] = []
        for i, plan in enumerate(plans):
            if not isinstance(plan, PruningPlan):
                raise InvalidInputError(
                    f"plans must be PruningPlan objects, got {type(plan).__name__} at index {i}; "
                    "load JSON plans with PruningPlan.from_json"
                )
            if plan.model_fingerprint is not None and plan.model_fingerprint != fp:
                raise InvalidPlanError(
                    f"plan {i} was made for another model ({plan.model_name or '?'}, fingerprint "
                    f"{plan.model_fingerprint}); this predictor is for {self.spec.model_name} "
                    f"with fingerprint {fp}"
                )
            aligns.append(plan.alignment)
            if plan.alignments:
                for name, a in plan.alignments.items():
                    j = gindex.get(name)
                    if j is not None:
                        ai.append(i)
                        aj.append(j)
                        av.append(a)
            g = plan.groups
            names.extend(g)
            gps.extend(g.values())
            owner.extend([i] * len(g))
        # bulk conversion: one comprehension per field is far cheaper than per-item work
        codes = _STRUCT_CODE
        plan_i = np.asarray(owner, dtype=np.int64)
        gj = np.asarray([gindex.get(n, -1) for n in names], dtype=np.int64)
        bj = np.asarray([bindex.get(n, -1) for n in names], dtype=np.int64)
        code = np.asarray([codes[gp.structure] for gp in gps], dtype=np.int64)
        val = np.asarray([gp.keep_ratio for gp in gps], dtype=float)
        unknown = (gj < 0) & (bj < 0)
        if unknown.any():
            k = int(np.flatnonzero(unknown)[0])
            raise InvalidPlanError(
                f"plan {int(plan_i[k])}: unknown group {names[k]!r} for model "
                f"{self.spec.model_name}; validate the plan with plan.validate(spec)"
            )
        bad = (gj >= 0) & (code == 4)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise InvalidPlanError(
                f"plan {int(plan_i[k])}: group {names[k]!r} is a channel group; 'block' is "
                "allowed only for block groups"
            )
        align = np.repeat(np.asarray(aligns, dtype=np.int64)[:, None], n_g, axis=1)
        align[ai, aj] = av
        ch = gj >= 0
        struct = np.zeros((n_p, n_g), dtype=np.int64)
        struct[plan_i[ch], gj[ch]] = code[ch]
        value = np.ones((n_p, n_g))
        value[plan_i[ch], gj[ch]] = val[ch]
        ratio = np.where(struct == 1, value, 1.0)
        density = np.where((struct == 2) | (struct == 3), value, 1.0)
        removed = np.zeros((n_p, n_b), dtype=bool)
        bl = (bj >= 0) & (code == 4)
        removed[plan_i[bl], bj[bl]] = True
        return EncodedPlans(self._keep_units(ratio, align, struct), struct, density, removed)

    def _keep_units(self, ratio: np.ndarray, align: np.ndarray, struct: np.ndarray) -> np.ndarray:
        """Vectorised ``autoprune.plan.keep_units`` (same rounding: half to even)."""
        units = np.broadcast_to(self.units, ratio.shape)
        k = np.maximum(1, np.rint(units * ratio)).astype(np.int64)
        snap = (align > 1) & (units > align)
        snapped = np.rint(k / np.where(align > 0, align, 1)).astype(np.int64) * align
        snapped = np.minimum(np.maximum(align, snapped), units)
        k = np.where(snap, snapped, k)
        k = np.maximum(np.minimum(self.min_units, units), k)
        k = np.where(k >= units, units, k)
        k = np.where(units <= 0, units, k)
        return np.where(struct == 1, k, units)

    # -- arrays -> per-layer widths -------------------------------------------------------
    def layer_arrays(self, enc: EncodedPlans) -> tuple[np.ndarray, ...]:
        """(cin, cout, struct code, density, present), each [P, L]."""
        n_p, n_l = enc.kept.shape[0], len(self.layer_names)
        units = self.units

        def width(segs: list[tuple[int, int]]) -> np.ndarray:
            w = np.zeros(n_p, dtype=np.int64)
            for g, ch in segs:
                w += ch if g < 0 else (ch * enc.kept[:, g]) // units[g]
            return w

        cin = np.stack([width(s) for s in self.in_segs], axis=1) if n_l else np.zeros((n_p, 0))
        cout = np.stack([width(s) for s in self.out_segs], axis=1) if n_l else np.zeros((n_p, 0))
        lstruct = np.zeros((n_p, n_l), dtype=np.int64)
        ldens = np.ones((n_p, n_l))
        for j, gs in enumerate(self.mask_groups):
            for g in gs:
                masked = (enc.struct[:, g] == 2) | (enc.struct[:, g] == 3)
                lstruct[:, j] = np.where(masked, enc.struct[:, g], lstruct[:, j])
                ldens[:, j] = np.where(masked, enc.density[:, g], ldens[:, j])
        present = np.ones((n_p, n_l), dtype=bool)
        for j, b in enumerate(self.layer_block):
            if b >= 0:
                present[:, j] = ~enc.removed[:, b]
        return cin, cout, lstruct, ldens, present



# ------------------------------------------------------------------------------------------
# Features
# ------------------------------------------------------------------------------------------
#: features that describe which layers leave the device's fast kernels (kernel rules):
#: time spent off the fast path, the tensors re-laid-out around it, and time spent *on* it. The
#: last one lets the non-negative linear model price the two paths with their own factors: in a
#: whole resnet18 at 64² the blocked convolutions cost about twice their micro-models, the
#: others about 1.05x (BENCHMARKS.md, "Blocked layers pay twice in context")
REGIME_FEATURES = ("table_ms_off", "off_act_m", "table_ms_fast")
#: what the whole model pays once its weights outgrow the caches (``autoprune.latency._memory``;
#: 0 where the device's rules carry no weight-streaming probe), in all and the share of it
#: read by layers on the fast path (the blocked kernels stall on weights fetched from beyond
#: the cache; the other path packs them and hides most of it)
MEMORY_FEATURES = ("stream_ms", "stream_ms_fast")
#: ramps of the share of a whole model's weight reads that miss the cache, as fractions of the
#: device's measured knee (``WeightStream.knee_mb``): each ramp rises from 0 at ``lo``·knee to
#: 1 at ``hi``·knee of the model's total weights read. A non-negative sum of the three is any
#: non-decreasing miss curve, so the linear model learns where misses start in a whole model
#: (earlier than in the probe's chain of 1x1 convs: on the Zen 2 VM at 64² whole models pay from
#: about 5 MB, the chain from about 10 MB; BENCHMARKS.md, "Where whole models start to miss")
MISS_RAMPS: tuple[tuple[float, float], ...] = ((1 / 6, 2 / 3), (1 / 3, 1.0), (2 / 3, 5 / 3))
#: per ramp, the weights (MB) read by fast-path and by other layers times the ramp's miss share
MISS_FEATURES = tuple(f"miss{i}_mb_{path}" for i in range(1, len(MISS_RAMPS) + 1)
                      for path in ("fast", "off"))
#: version of the features' definitions, stored with every fitted dataset: a dataset whose
#: features an earlier definition computed is refitted on features computed now (its
#: measurements stay valid). 2 (2026-12-03): ``stream_ms`` from the weights a forward pass reads
#: (``LayerSpec.touched_params``), not every weight. 3 (2026-12-03): ``table_ms_fast`` and
#: ``stream_ms_fast``. 4 (2026-12-03): ``MISS_FEATURES``
FEATURES_VERSION = 4
#: extra features of the non-monotone regressor
FREE_FEATURES = ("misaligned_share", "misaligned_table_ms", "blocks_removed")


class PlanFeaturizer:
    """Table and graph features of plans for one model on one table.

    ``table``: anything with ``lookup(spec, structure, density, policy=..., backend=...)`` (a
    ``LatencyTable``); its ``kernel_rules`` (if any) mark the layers that leave the fast path.
    ``miss_policy``: the table's miss policy ("interpolate" never raises for a profiled
    model; "measure" needs ``backend``). ``free``: also the non-monotone extras.
    """

    def __init__(self, spec: ModelSpec, table: Any, miss_policy: str = "interpolate",
                 backend: Any = None, free: bool = False) -> None:
        self.spec = spec
        self.table = table
        self.miss_policy = miss_policy
        self.backend = backend
        self.free = free
        self.compiled = CompiledSpec(spec)
        self.rules = getattr(table, "kernel_rules", None)
        self.kinds = sorted({op.value for op in self.compiled.ops})
        accelerated = getattr(table, "accelerated", None)
        self._accelerated = np.array(
            [True, True] + [bool(accelerated(_CODE_STRUCT[c])) if callable(accelerated) else True
                            for c in (2, 3)] + [True])
        align = int(getattr(table, "alignment", 0) or 0)
        self.alignment = align if align > 1 else 16
        self._cache: dict[tuple[int, int, int, int, float], tuple[float, ...]] = {}
        names = ["table_ms", *(f"table_ms_{k}" for k in self.kinds), "table_ms_masked",
                 "table_ms_sq", "table_ms_sqrt", "macs_m", "params_m", "act_m", "n_layers",
                 *REGIME_FEATURES, *MEMORY_FEATURES, *MISS_FEATURES]
        self.names: list[str] = names + (list(FREE_FEATURES) if free else [])

    def frame(self, plans: Sequence[PruningPlan]) -> Any:
        """Features as a DataFrame (one row per plan, columns ``names``)."""
        import pandas as pd

        return pd.DataFrame(self.matrix(plans), columns=self.names)

    def matrix(self, plans: Sequence[PruningPlan]) -> np.ndarray:
        c = self.compiled
        enc = c.encode(plans)
        cin, cout, lstruct, ldens, present = c.layer_arrays(enc)
        n_p, n_l = cin.shape
        vals = np.zeros((7, n_p, n_l))
        for j in range(n_l):
            vals[:, :, j] = self._layer_values(j, cin[:, j], cout[:, j], lstruct[:, j],
                                               ldens[:, j])
        lat, macs, params, act, off, in_act, touched = vals
        pm = present.astype(float)
        lat = lat * pm
        total = lat.sum(axis=1)
        ops = np.array([op.value for op in c.ops])
        cols: list[np.ndarray] = [total]
        cols += [lat[:, ops == k].sum(axis=1) for k in self.kinds]
        cols.append((lat * (lstruct >= 2)).sum(axis=1))
        cols.append(total ** 2)  # convex and concave terms of the table sum (both monotone)
        cols.append(np.sqrt(total))
        cols.append((macs * pm).sum(axis=1) / 1e6)
        cols.append((params * pm).sum(axis=1) / 1e6)
        cols.append((act * pm).sum(axis=1) / 1e6)
        cols.append(pm.sum(axis=1))
        offp = off * pm
        cols.append((lat * offp).sum(axis=1))  # time spent in slow kernel paths
        cols.append((in_act * offp).sum(axis=1) / 1e6)  # tensors re-laid-out around them
        cols.append((lat * (pm - offp)).sum(axis=1))  # time spent on the fast path
        stream = getattr(self.rules, "weight_stream", None)
        # float32 weights (MB) each layer reads (a tap that only meets padding is not read); a
        # removed layer streams nothing
        read_mb = touched * pm * 4 / 1e6
        streamed = stream.plan_stream_ms(read_mb) if stream is not None else np.zeros(n_p)
        fast_mb = (read_mb * (1.0 - off)).sum(axis=1)
        cols.append(streamed)
        cols.append(streamed * fast_mb / np.maximum(read_mb.sum(axis=1), 1e-12))
        total_mb = read_mb.sum(axis=1)
        knee = stream.knee_mb if stream is not None else math.inf
        for lo, hi in MISS_RAMPS:
            share = (np.clip((total_mb - lo * knee) / ((hi - lo) * knee), 0.0, 1.0)
                     if math.isfinite(knee) else np.zeros(n_p))
            cols += [fast_mb * share, (total_mb - fast_mb) * share]
        if self.free:
            mis = ((cout % self.alignment) != 0) & present
            cols.append(mis.sum(axis=1) / np.maximum(1, present.sum(axis=1)))
            cols.append((lat * mis).sum(axis=1))
            cols.append(enc.removed.sum(axis=1).astype(float))
        return np.stack(cols, axis=1)

    def table_sum_ms(self, plans: Sequence[PruningPlan]) -> np.ndarray:
        """The plain table part (sum of per-layer table latencies) of each plan."""
        return self.matrix(plans)[:, 0]

    def _layer_values(
        self, j: int, cin: np.ndarray, cout: np.ndarray, st: np.ndarray, dens: np.ndarray
    ) -> np.ndarray:
        """[7, P]: table latency, MACs, params, activation elements, off-fast-path flag, input
        activation elements and the parameters a forward pass reads (``touched_params``) of
        layer ``j`` for each plan. Each distinct (widths,
        structure, density) is looked up once and cached; a mask structure the device does not
        accelerate is priced dense (what the table's own lookup does)."""
        st = np.where(self._accelerated[st], st, 0)
        if np.all(st == 0):
            code = (cin.astype(np.int64) << 32) | cout.astype(np.int64)
            uniq, inv = np.unique(code, return_inverse=True)
            keys = [(j, int(u >> 32), int(u & 0xFFFFFFFF), 0, 1.0) for u in uniq]
        else:
            raw = list(zip(cin.tolist(), cout.tolist(), st.tolist(), dens.tolist()))
            index: dict[tuple[Any, ...], int] = {}
            inv = np.empty(len(raw), dtype=np.int64)
            keys = []
            for i, (a, b, s, d) in enumerate(raw):
                k = (j, a, b, s, d if s else 1.0)
                pos = index.get(k)
                if pos is None:
                    pos = index[k] = len(keys)
                    keys.append(k)
                inv[i] = pos
        vals = np.array([self._lookup(k) for k in keys], dtype=float).reshape(len(keys), 7)
        out: np.ndarray = vals[inv].T
        return out

    def _lookup(self, key: tuple[int, int, int, int, float]) -> tuple[float, ...]:
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        j, cin, cout, code, density = key
        spec = self.compiled.layer_specs[j].with_channels(cin, cout)
        extra = {"backend": self.backend} if self.backend is not None else {}
        ms = float(self.table.lookup(spec, _CODE_STRUCT[code], density, policy=self.miss_policy,
                                     **extra))
        off = float(self.rules.off_fast_path(spec)) if self.rules is not None else 0.0
        in_act = spec.batch * spec.in_channels * _prod(spec.input_size)
        val = (ms, float(spec.macs), float(spec.params), float(spec.activation_elems), off,
               float(in_act), float(spec.touched_params))
        self._cache[key] = val
        return val


def _prod(xs: Sequence[int]) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def plan_signature(compiled: CompiledSpec, plan: PruningPlan) -> bytes:
    """Plans with the same signature price the same (kept widths, structures, removed blocks)."""
    enc = compiled.encode([plan])
    return (enc.kept.tobytes() + enc.struct.tobytes() + np.round(enc.density, 4).tobytes()
            + enc.removed.tobytes())


__all__ = ["FEATURES_VERSION", "CompiledSpec", "EncodedPlans", "PlanFeaturizer",
           "plan_signature"]
