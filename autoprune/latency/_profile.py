"""``profile``: measure what every layer of a model costs on a device, at every width the search
may choose, into a resumable ``LatencyTable``.

1. The model is analysed (``autoprune.analyze``) unless a ``ModelSpec`` is given.
2. The device's kernel rules (``autoprune.latency._rules``: output staircase, input and depthwise
   steps) come from the per-device cache, detected on first use, unless the table already has
   an alignment; the table's alignment is theirs.
3. Work items: each unique layer configuration (``LayerSpec`` with its fused ops) × the width
   grid of its input and output channels × the structures the backend accelerates for it.
   The width grid of a prunable dimension (``width_grid``) is, per group, the smallest width the
   search can keep (one alignment step), the widths at keep ratios 0.25, 0.5, 0.75 snapped to
   the alignment, and the full width (``widths="auto"``; "fine" uses 16 ratios, "full" only the
   dense width, a sequence gives the ratios). A fixed dimension keeps its width. Any width in
   between is covered by ``LatencyTable.lookup(..., policy="interpolate")`` (the rules, then
   bilinear between the grid widths around it); with rules, one entry just off the fast path
   below each grid width of a rule-governed axis prices that layer's own slow path.
4. Entries already in the table for this device are skipped; the rest are measured in chunks,
   interleaved round-robin within a chunk, and the table is saved atomically after every chunk,
   so a killed run loses at most the chunk in flight and a rerun measures only what is missing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from autoprune.errors import InvalidInputError, TableMismatchError
from autoprune.latency._rules import (
    KernelRules,
    cached_kernel_rules,
    staircase_rss,
)
from autoprune.latency._table import EntryKey, LatencyTable, entry_key
from autoprune.types import LayerSpec, ModelSpec, OpKind, Segment, Structure, keep_units

if TYPE_CHECKING:
    from torch import nn

    from autoprune.backends.base import Backend

WidthsOption = Literal["auto", "fine", "full"] | Sequence[float]
AUTO_RATIOS: tuple[float, ...] = (0.25, 0.5, 0.75)
ALIGNMENT_CANDIDATES: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
WorkItem = tuple[LayerSpec, Structure, float]


# --------------------------------------------------------------------------------------------
# Alignment detection
# --------------------------------------------------------------------------------------------
def representative_layer(spec: ModelSpec | None = None) -> LayerSpec:
    """The layer the alignment sweep varies (its output channels).

    The channel step is a property of the runtime's kernels, so the sweep uses a fixed layer
    with enough work per output channel for the steps to stand out of the noise: a 3x3 conv
    64→n at 8x8 (conv2d models and the default), a 1-D conv 64→n, kernel 3, length 64 (models
    whose costliest layers are 1-D convs) or a linear 256→n on 64 tokens (linear-only models).
    """
    conv2d = LayerSpec(OpKind.CONV2D, 64, 64, (3, 3), (1, 1), (1, 1), (1, 1), 1, (8, 8))
    if spec is None:
        return conv2d
    ops = {lay.spec.op for lay in spec.layers.values()}
    if OpKind.CONV2D in ops or OpKind.DWCONV2D in ops:
        return conv2d
    if OpKind.CONV1D in ops or OpKind.DWCONV1D in ops:
        return LayerSpec(OpKind.CONV1D, 64, 64, (3,), (1,), (1,), (1,), 1, (64,))
    if OpKind.LINEAR in ops:
        return LayerSpec(OpKind.LINEAR, 256, 64, input_size=(64,))
    return conv2d


def fit_alignment(widths: Sequence[int], latency_ms: Sequence[float],
                  candidates: Sequence[int] = ALIGNMENT_CANDIDATES,
                  min_r2: float = 0.5) -> tuple[int, dict[int, float]]:
    """The staircase step that explains ``latency_ms(widths)`` best.

    For each candidate step *a* the model ``latency = α + β · ceil(width / a) · a`` is fitted
    by least squares; the step with the smallest residual wins (a = 1 means no staircase).
    A flat sweep (launch-bound GPU layers) has no staircase: if the best fit explains less
    than ``min_r2`` of the variance (R², measured 0.05 on an H100 vs 0.98+ on the CPU) the
    residuals only rank noise, and the step is 1.
    Returns (step, {step: residual sum of squares}).
    """
    y = np.asarray(latency_ms, dtype=float)
    rss = staircase_rss(widths, latency_ms, candidates)
    finite = {a: r for a, r in rss.items() if math.isfinite(r)}
    if not finite:
        return 1, rss
    best = min(finite, key=lambda a: (finite[a], a))
    tss = float(((y - y.mean()) ** 2).sum())
    if tss <= 0 or finite[best] > (1.0 - min_r2) * tss:
        return 1, rss
    return best, rss


# --------------------------------------------------------------------------------------------
# Work items
# --------------------------------------------------------------------------------------------
def _ratios(widths: WidthsOption) -> list[float] | None:
    if isinstance(widths, str):
        if widths == "auto":
            return list(AUTO_RATIOS)
        if widths == "fine":
            return [i / 16 for i in range(1, 16)]
        if widths == "full":
            return None
        raise InvalidInputError(
            f"widths={widths!r}; use 'auto', 'fine', 'full' or a list of keep ratios in (0, 1]"
        )
    ratios = [float(r) for r in widths]
    if any(not 0 < r <= 1 for r in ratios):
        raise InvalidInputError(f"widths={widths!r}: keep ratios must lie in (0, 1]")
    return ratios


def width_grid(
    segments: Sequence[Segment], spec: ModelSpec, alignment: int, widths: WidthsOption = "auto"
) -> list[int]:
    """Channel counts a layer dimension made of ``segments`` is profiled at (ascending).

    Each prunable channel-group segment is scaled to its smallest keepable unit count, to the
    keep ratios of ``widths`` snapped by ``keep_units(..., alignment)`` and to full; fixed
    segments keep their width. All segments of a dimension scale together.
    """
    full = sum(ch for _, ch in segments)
    ratios = _ratios(widths)
    prunable = [
        (g, ch) for g, ch in segments
        if g is not None and g in spec.groups and spec.groups[g].kind == "channel"
        and Structure.CHANNEL in spec.groups[g].allowed
    ]
    if ratios is None or not prunable:
        return [full]
    out = {full}
    for r in [0.0, *ratios]:
        total = 0
        for gname, ch in segments:
            grp = spec.groups.get(gname) if gname is not None else None
            if (gname, ch) not in prunable or grp is None:
                total += ch
                continue
            units = grp.units
            if r == 0.0:
                k = keep_units(units, 1.0 / max(units, 1) * 0.5, alignment, minimum=grp.min_units)
                k = min(k, alignment if units > alignment else k)
                k = max(k, min(grp.min_units, units))
            else:
                k = keep_units(units, r, alignment, minimum=grp.min_units)
            total += ch * k // units
        out.add(total)
    return sorted(w for w in out if w > 0)


def enumerate_items(
    spec: ModelSpec,
    backend: Backend | None,
    alignment: int,
    widths: WidthsOption = "auto",
    structures: Sequence[Structure | str] | None = None,
    rules: KernelRules | None = None,
) -> list[WorkItem]:
    """Unique (layer spec at a grid width, structure, density) items to profile, in a stable
    order (model order, then widths). ``backend=None``: dense entries only. With the device's
    ``rules``, every layer whose prunable width can leave a fast kernel path (a 2-D conv's
    input channels, a depthwise conv's channels) also gets one entry just off that path, so
    the table prices that layer's own slow path instead of the sweep layer's penalty."""
    wanted = [Structure(s) for s in (structures or [Structure.NONE, Structure.NM])]
    producers_nm: set[str] = set()
    for g in spec.groups.values():
        if Structure.NM in g.allowed:
            producers_nm.update(g.producers)
    seen: dict[EntryKey, None] = {}
    for lay in spec.layers.values():
        ins = width_grid(lay.in_segments, spec, alignment, widths)
        outs = width_grid(lay.out_segments, spec, alignment, widths)
        if lay.spec.op.is_depthwise:
            pairs = [(w, w) for w in sorted(set(ins) | set(outs))]
        else:
            pairs = [(ci, co) for ci in ins for co in outs]
        pairs += _off_path_pairs(lay.spec, ins, outs, rules)
        for ci, co in pairs:
            s = lay.spec.with_channels(ci, co)
            for st in wanted:
                if st == Structure.NONE:
                    seen.setdefault(entry_key(s, st, 1.0), None)
                elif (st == Structure.NM and lay.name in producers_nm and backend is not None
                      and backend.accelerates(st, s)):
                    seen.setdefault(entry_key(s, st, 0.5), None)
    return list(seen)


def _off_path_pairs(spec: LayerSpec, ins: list[int], outs: list[int],
                    rules: KernelRules | None) -> list[tuple[int, int]]:
    """(in, out) widths one channel below each grid width (but the smallest; for a grouped
    conv one channel per group below every grid width on its per-group step) of a prunable
    axis that a kernel rule applies to: those widths are off the fast path, and the table
    interpolates the layer's own slow-path factor between them."""
    if rules is None:
        return []
    if spec.op == OpKind.DWCONV2D and rules.dw_step > 1:
        grid = sorted(set(ins) | set(outs))
        return [(c - 1, c - 1) for c in grid[1:] if c > rules.dw_step and c % rules.dw_step == 0]
    if spec.op == OpKind.CONV2D and spec.groups == 1 and rules.in_step > 1 and len(ins) > 1:
        co = outs[len(outs) // 2]
        return [(ci - 1, co) for ci in ins[1:] if ci > rules.in_step and ci % rules.in_step == 0]
    if spec.op == OpKind.CONV2D and spec.groups > 1 and rules.group_step > 1 and ins:
        g = spec.groups  # one channel less per group: the per-group width leaves the step
        out = []
        for ci, co in zip(ins, outs if len(outs) == len(ins) else [outs[-1]] * len(ins)):
            if ci % g or co % g or (ci // g) <= 1 or not rules.fast_group_width(ci // g):
                continue
            out.append((ci - g, co - g if co == ci else co))
        return out
    return []


# --------------------------------------------------------------------------------------------
# profile
# --------------------------------------------------------------------------------------------
def profile(
    model: nn.Module,
    example_inputs: Any,
    backend: Backend,
    table: LatencyTable | None = None,
    spec: ModelSpec | None = None,
    root: str | Path | Literal[False] | None = None,
    widths: WidthsOption = "auto",
    structures: Sequence[Structure | str] | None = None,
    progress: bool = True,
    max_entries: int | None = None,
    save_every: int = 8,
    alignment: int | None = None,
    kernel_rules: KernelRules | None = None,
) -> LatencyTable:
    """Profile ``model`` on ``backend`` into a latency table (resumable, incremental).

    ``model`` is only used to analyse it: with ``spec`` given it may be None.
    ``table``: extend this table (must be of the backend's device); default: the table in
    ``root/<device_id>`` if there is one, else a new one saved there. ``root=None`` (default):
    the user cache, ``autoprune.io.cache_dir()/latency_tables`` (``$AUTOPRUNE_CACHE``, else
    ``$XDG_CACHE_HOME/autoprune``, else ``~/.cache/autoprune``), never the working directory;
    ``root=False``: keep the new table in memory only (nothing is read or written).
    ``spec``: the model's ``ModelSpec`` (default ``autoprune.analyze``).
    ``widths``: the width grid (see the module docstring). ``structures``: candidates besides
    dense (default: ``nm`` where the backend accelerates it). ``max_entries``: measure at most
    this many new entries (the rest on a later run). ``alignment``: skip the kernel-rule
    detection and snap the width grid to this step. ``kernel_rules``: the device's rules
    (default: ``cached_kernel_rules(backend)``, detected once per device and cached).
    Returns the table (saved if it has a directory).
    """
    from tqdm.auto import tqdm

    if save_every < 1:
        raise InvalidInputError(f"save_every={save_every}; use >= 1")
    device = backend.device_info()
    if not (root is None or root is False or isinstance(root, (str, Path))):
        raise InvalidInputError(
            f"root={root!r}; use a directory, None (the user cache) or False (memory only)"
        )
    if table is None:
        directory = LatencyTable.default_dir(device, root) if root is not False else None
        if directory is not None and (directory / "table.json").exists():
            table = LatencyTable.load(directory, expect_device=device)
        else:
            accel = [s for s in (Structure.NONE, Structure.NM) if backend.accelerates(s)]
            table = LatencyTable(device, protocol=backend.protocol, structures=accel)
            table.path = directory
    elif table.device_id != device.device_id:
        raise TableMismatchError(
            f"table is for {table.device_id} but the backend is {device.device_id} (differs in "
            f"{', '.join(device.diff(table.device)) or 'device_id'})"
        )
    if spec is None:
        from autoprune._analyze import analyze
        from autoprune.onnx_export import as_input_tuple

        spec = analyze(model, as_input_tuple(example_inputs))
    if alignment is not None:
        table.alignment = int(alignment)
    elif table.alignment is None and table.kernel_rules is None:
        # a new table: the device's rules, detected once per device with fixed layers (not
        # this model's); a table made with an explicit alignment (or before rules) keeps it
        rules = kernel_rules if kernel_rules is not None else cached_kernel_rules(backend)
        table.kernel_rules = rules
        table.alignment = rules.alignment
        if table.path is not None:
            table.save()
    elif table.kernel_rules is not None and table.kernel_rules.weight_stream is None \
            and kernel_rules is None:
        # a table made before the weight-streaming probe: the device's probe (cached once)
        stream = cached_kernel_rules(backend).weight_stream
        if stream is not None:
            table.kernel_rules = dataclasses.replace(table.kernel_rules, weight_stream=stream)
            if table.path is not None:
                table.save()
    if table.alignment is None:
        table.alignment = table.kernel_rules.alignment if table.kernel_rules else 1
    items = enumerate_items(spec, backend, table.alignment, widths, structures,
                            rules=table.kernel_rules)
    todo = [it for it in items if not table.has(*it)]
    if max_entries is not None:
        todo = todo[: max(0, int(max_entries))]
    bar = tqdm(total=len(todo), desc=f"profile {spec.model_name}", unit="entry",
               disable=not progress or not todo)
    try:
        for start in range(0, len(todo), save_every):
            chunk = todo[start : start + save_every]
            samples = backend.measure_layers(chunk)
            for (s, st, d), sample in zip(chunk, samples):
                table.add(s, st, d, sample)
            if table.path is not None:
                table.save()
            bar.update(len(chunk))
    finally:
        bar.close()
    if table.path is not None and not todo and not (table.path / "table.json").exists():
        table.save()  # a new table with nothing to measure still gets its files
    return table


def missing_entries(table: LatencyTable, spec: ModelSpec, backend: Backend,
                    widths: WidthsOption = "auto",
                    structures: Sequence[Structure | str] | None = None) -> list[WorkItem]:
    """Work items ``profile`` would still measure for ``spec`` into ``table``."""
    if table.alignment is None:
        raise InvalidInputError("the table has no alignment yet; run profile() first")
    items = enumerate_items(spec, backend, table.alignment, widths, structures,
                            rules=table.kernel_rules)
    return [it for it in items if not table.has(*it)]
