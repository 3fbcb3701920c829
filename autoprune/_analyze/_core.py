"""``analyze(model, example_inputs) -> ModelSpec``: prunable groups and layer shapes.

Coupled channels come from torch-pruning's ``DependencyGraph`` (residual adds, concatenations,
depthwise chains, grouped convolutions, attention embeddings); layer shapes come from forward
hooks in one real forward pass; what the runtime fuses after each layer and which residual
blocks have an identity shortcut are read off the autograd graph of that same pass.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from autoprune._analyze._adapters import ADAPTERS, LayerAdapter, Side
from autoprune._analyze._plain import without_torch_pruning
from autoprune._analyze._tpglue import (
    Graphs,
    build_graphs,
    check_channel_groups,
    functional_weight_modules,
    normalize_inputs,
)
from autoprune._analyze._trace import (
    Record,
    Trace,
    consumers,
    fused_after,
    is_identity_residual,
    trace_forward,
)
from autoprune.errors import InvalidInputError, UnsupportedLayerError
from autoprune.types import Layer, ModelSpec, PrunableGroup, Structure

__all__ = ["NM_MULTIPLE", "analyze"]

#: nm is offered on a group only if every producer's input width per group is a multiple of this
NM_MULTIPLE = 4


def _segments(labels: list[str | None]) -> tuple[tuple[str | None, int], ...]:
    """Channel labels -> segments, one per group in order of first appearance (a group whose
    channels are interleaved with others still gets one segment with its total count)."""
    counts: dict[str | None, int] = {}
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    return tuple((k, v) for k, v in counts.items())


def _is_unit_partition(units: int, d: int) -> bool:
    return d >= 1 and units % d == 0


def _under(path: str, prefixes: Sequence[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def analyze(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    ignore: Sequence[str] | None = None,
    model_name: str | None = None,
    check: bool = True,
) -> ModelSpec:
    """Find the prunable groups and the layer shapes of ``model``.

    Args:
        model: any ``nn.Module``; it is not modified (its train/eval mode is restored). A model
            pruned with ``torch.nn.utils.prune`` is analysed as a copy with the pruning made
            permanent (what a device runs); the model itself keeps its hooks.
        example_inputs: a tensor or tuple of tensors, at the batch size and input size the
            model will be deployed with (layer shapes are measured from them).
        ignore: module paths to keep unpruned (each is warned about; recorded in
            ``ModelSpec.ignored``). A module autoprune cannot handle raises
            ``UnsupportedLayerError`` unless it is listed here.
        model_name: name recorded in the spec (default: the class name).
        check: prune one unit of every channel group on a copy and run it, so that only groups
            torch-pruning can really remove are offered ``channel``.

    Returns:
        a ``ModelSpec``; channel groups are named after their first producing layer.
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = normalize_inputs(example_inputs)
    # torch.nn.utils.prune: analyze the model as a device runs it (plain weights holding the
    # zeros) on a copy; its non-leaf masked weights made copy.deepcopy fail (issue 12)
    model = without_torch_pruning(model)
    if isinstance(ignore, str):
        raise InvalidInputError(
            f"ignore must be a list of module paths, got the string {ignore!r}; "
            f"pass ignore=[{ignore!r}]"
        )
    ignore = list(dict.fromkeys(ignore or []))
    modules = dict(model.named_modules())
    for path in ignore:
        if not isinstance(path, str) or path not in modules:
            raise InvalidInputError(
                f"ignore path {path!r} is not a module of {type(model).__name__}; "
                f"examples of paths: {', '.join(list(modules)[1:6])}"
            )
    ignored_ids = {id(m) for path in ignore for m in modules[path].modules()}
    names = {m: n for n, m in modules.items()}

    for path, m in modules.items():
        unsupported = ADAPTERS.unsupported(m)
        if unsupported is not None and id(m) not in ignored_ids:
            raise unsupported.refuse(path, m)
    for path in ignore:
        warnings.warn(
            f"analyze: module {path!r} ({type(modules[path]).__name__}) is ignored: its channels "
            "and every group coupled to them stay unpruned",
            stacklevel=2,
        )

    was_training = model.training
    model.eval()
    try:
        trace = trace_forward(model, inputs)
        for path in functional_weight_modules(model, trace.calls):
            if not _under(path, ignore):
                mod = model.get_submodule(path) if path else model
                raise UnsupportedLayerError(
                    path or "<model>", type(mod).__name__,
                    "it reads its conv/linear layers' weights without calling them (functional "
                    "use), which neither autoprune's hooks nor torch-pruning can follow",
                )
        graphs = build_graphs(model, inputs, ignore)
        _report_trace_failures(model, graphs, ignore)
        spec = _build_spec(model, inputs, trace, graphs, names, ignored_ids, ignore, model_name)
        if check:
            spec = check_channel_groups(model, inputs, spec)
    finally:
        model.train(was_training)
    return spec


def _report_trace_failures(model: nn.Module, graphs: Graphs, ignore: Sequence[str]) -> None:
    """Warn about modules torch-pruning traced only in parts; raise ``UnsupportedLayerError``
    for a module with its own parameters that it cannot trace at all (unless ignored)."""
    if not graphs.failures:
        return
    for path, why in graphs.failures.items():
        if any(path == p or path.startswith(p + ".") for p in ignore):
            continue
        mod = model.get_submodule(path) if path else model
        own = any(True for _ in mod.parameters(recurse=False))
        inner = [p for p in graphs.graphs if p.startswith(path + ".") or (not path and p)]
        if own or not inner:
            raise UnsupportedLayerError(
                path or "<model>", type(mod).__name__,
                f"torch-pruning cannot trace it ({why})",
            )
    top = graphs.failures.get("", "")
    parts = sorted(p for p in graphs.failures if p)
    warnings.warn(
        f"analyze: torch-pruning cannot trace {type(model).__name__} as a whole ({top}); "
        f"analysed {len(graphs.graphs)} submodules separately; channels crossing "
        f"{len(parts)} untraceable modules (e.g. {', '.join(parts[:3])}) get masks only",
        stacklevel=3,
    )


@dataclass
class _Sublayer:
    """One ``LayerSpec`` row of the model: a module (or a part of one, e.g. an attention
    module's ``in_proj``), its adapter, and per channel the group that controls it."""

    module: nn.Module
    adapter: LayerAdapter
    suffix: str
    record: Record
    in_labels: list[str | None]
    out_labels: list[str | None]


def _order_of(path: str, order: dict[str, int]) -> tuple[int, int]:
    """Sort key of a layer path: its module's position in ``named_modules`` order; a path
    ending in a sublayer name (``in_proj``, ``attention``, ``out_proj``) sorts right after its
    parent module, in sublayer order. That holds for any module so named, not only for the
    sublayers of an attention module: layer order is part of ``ModelSpec.fingerprint`` (and
    the first producer names a group), so it stays as specs were always ordered."""
    base, _, suffix = path.rpartition(".")
    sub = ADAPTERS.sublayer_rank(suffix) if suffix else None
    if sub is not None and base in order:
        return order[base], sub
    return order.get(path, len(order)), 0


def _sublayers(
    trace: Trace, ignored_ids: set[int], order: dict[str, int]
) -> dict[str, _Sublayer]:
    """Every sublayer of every modelled layer the forward pass saw, keyed by layer path."""
    adapters = {n: ADAPTERS.layer(r.module) for n, r in trace.records.items()}
    owners = [n for n, a in adapters.items() if a is not None and a.owns_children]
    subs: dict[str, _Sublayer] = {}
    for n, r in trace.records.items():
        adapter = adapters[n]
        if adapter is None or any(n.startswith(p + ".") for p in owners):
            continue  # a child the owning adapter models (an attention module's out_proj)
        if id(r.module) in ignored_ids:
            continue
        adapter.check(r.module, n)
        widths = adapter.widths(r.module)
        for suffix in adapter.sublayers(r.module):
            path = f"{n}.{suffix}" if suffix else n
            w = widths[suffix]
            subs[path] = _Sublayer(
                r.module, adapter, suffix, r, [None] * w.in_channels, [None] * w.out_channels,
            )
    return subs


def _build_spec(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    trace: Trace,
    graphs: Graphs,
    names: dict[nn.Module, str],
    ignored_ids: set[int],
    ignore: list[str],
    model_name: str | None,
) -> ModelSpec:
    fixed: dict[str, str] = {}
    for ignored_path in ignore:
        fixed[ignored_path] = "ignored by the user (ignore=...)"

    # --- layers seen in the forward pass ------------------------------------------------
    records = trace.records
    order = {n: i for i, n in enumerate(names.values())}
    subs = _sublayers(trace, ignored_ids, order)

    def order_of(path: str) -> tuple[int, int]:
        return _order_of(path, order)

    # --- channel groups from torch-pruning -----------------------------------------------
    groups: dict[str, PrunableGroup] = {}
    group_divisor: dict[str, int] = {}
    raw_groups = [
        (prefix, dg, g)
        for prefix, dg in graphs.graphs.items()
        for g in dg.get_all_groups(
            ignored_layers=[m for m in model.modules() if id(m) in ignored_ids],
            root_module_types=ADAPTERS.root_module_types(),
        )
    ]
    # (layer path, side, idxs): side "in" / "out" (the group's indices) or "all"
    Touch = tuple[str, Side, list[int]]
    pending: list[tuple[list[Touch], int, set[str], str]] = []
    for prefix, dg, g in raw_groups:
        units = len(g[0].idxs)
        touched: list[Touch] = []
        members: set[str] = set()
        consumed = False
        ignored_hit = False
        for item in g:
            dep, idxs = item.dep, list(item.idxs)
            mod = dep.target.module
            if not isinstance(mod, nn.Module):
                continue  # nn.Parameter (class tokens, layer scales): pruned along, not a layer
            path = names.get(mod)
            if path is None:
                continue
            if id(mod) in ignored_ids:
                ignored_hit = True
            members.add(path)
            adapter = ADAPTERS.layer(mod)
            if adapter is None:
                continue
            is_out = dg.is_out_channel_pruning_fn(dep.handler)
            is_in = dg.is_in_channel_pruning_fn(dep.handler)
            for suffix, side in adapter.coupling(mod, is_in, is_out):
                sub_path = f"{path}.{suffix}" if suffix else path
                if sub_path not in subs:
                    continue
                consumed = consumed or side in ("in", "all")
                touched.append((sub_path, side, idxs))
        if ignored_hit:
            continue
        if not consumed:
            # channels that reach the model output (the classifier's logits), or leave a
            # module that torch-pruning could only trace in parts
            for path, side, _ in touched:
                if side != "out":
                    continue
                rec = records.get(path)
                if not prefix or (rec is not None and rec.out_fn in trace.output_fns):
                    fixed.setdefault(path, "output channels are the model output")
                    break
            else:
                # leaves a module traced in parts: the channels stay, masks are still possible
                pending.append((touched, units, members,
                                f"channels leave {prefix!r}, which torch-pruning can only "
                                "trace in parts: masks only"))
            continue
        pending.append((touched, units, members, ""))

    used_names: set[str] = set()
    mask_only: dict[str, str] = {}
    for touched, units, members, why_fixed in pending:
        producers = sorted(
            {p for p, side, _ in touched if side in ("out", "all")
             and subs[p].adapter.is_producer(subs[p].module, subs[p].suffix)},
            key=order_of,
        )
        if not producers:
            continue
        name = producers[0]
        if name in used_names:  # should not happen; keep names unique anyway
            name = f"{name}#{len(used_names)}"
        used_names.add(name)
        # unit partition: grouped convolutions and attention heads must shrink evenly
        d = 1
        for p, _, _ in touched:
            d = math.lcm(d, subs[p].adapter.unit_partition(subs[p].module))
        for p, side, idxs in touched:
            sub = subs[p]
            if side == "all":
                sub.in_labels[:] = [name] * len(sub.in_labels)
                sub.out_labels[:] = [name] * len(sub.out_labels)
                continue
            lab = sub.in_labels if side == "in" else sub.out_labels
            for i in idxs:
                lab[i] = name
        group_divisor[name] = d
        if why_fixed:
            mask_only[name] = why_fixed
        groups[name] = PrunableGroup(
            name=name, kind="channel", units=units, allowed=(Structure.NONE,),
            producers=tuple(producers), members=tuple(sorted(members, key=lambda p: order.get(p, 0))),
        )

    groups = dict(sorted(groups.items(), key=lambda kv: order_of(kv[0])))

    # --- layers ---------------------------------------------------------------------------
    cons = consumers(trace.output_fns)
    layers: dict[str, Layer] = {}
    for n in sorted(subs, key=order_of):
        sub = subs[n]
        rec = sub.record
        dtype = str(rec.dtype).replace("torch.", "")
        # the fused ops follow the module's output: only a module that is one layer has them
        fused = fused_after(rec.out_fn, cons) if len(sub.adapter.sublayers(sub.module)) == 1 else ""
        spec = sub.adapter.layer_spec(sub.module, sub.suffix, rec.input_shape, dtype, fused)
        layers[n] = Layer(n, spec, _segments(sub.in_labels), _segments(sub.out_labels))

    # model input channels: layers whose input channels no group controls and that read a
    # model input directly
    for n, lay in layers.items():
        if all(g is None for g, _ in lay.in_segments) and not subs[n].suffix:
            rec = subs[n].record
            if any(tuple(t.shape) == rec.input_shape for t in inputs):
                fixed.setdefault(f"{n}.in_channels", "input channels are the model input")

    # --- allowed structures -----------------------------------------------------------------
    for name, g in list(groups.items()):
        allowed = [Structure.NONE]
        d = group_divisor[name]
        units, unit_size, note = g.units, 1, ""
        if name in mask_only:
            note = mask_only[name]
        elif _is_unit_partition(g.units, d):
            if d > 1:
                units, unit_size = g.units // d, d
                note = (f"channels shrink evenly across {d} partitions (grouped conv / heads); "
                        f"a unit is {d} channels, one per partition")
            if units > 1:
                allowed.append(Structure.CHANNEL)
        nm_ok = True
        for p in g.producers:
            lay = layers[p]
            per_group = lay.spec.in_channels // lay.spec.groups
            if per_group % NM_MULTIPLE != 0:
                nm_ok = False
        if nm_ok:
            allowed.append(Structure.NM)
        allowed.append(Structure.UNSTRUCTURED)
        groups[name] = PrunableGroup(
            name=g.name, kind="channel", units=units, allowed=tuple(allowed),
            producers=g.producers, members=g.members, unit_size=unit_size, note=note,
        )

    # --- residual blocks with an identity shortcut ------------------------------------------
    candidates = []
    for path, (in_fn, out_fn, in_shape, out_shape) in trace.blocks.items():
        if in_shape != out_shape or trace.calls.get(path, 0) != 1:
            continue
        if id(model.get_submodule(path)) in ignored_ids:
            continue
        if is_identity_residual(in_fn, out_fn):
            candidates.append(path)
    # innermost only: a Sequential of residual blocks is itself "residual" but its blocks are
    # the units worth removing
    cand_set = set(candidates)
    blocks = [c for c in candidates if not any(o != c and o.startswith(c + ".") for o in cand_set)]
    block_of: dict[str, str] = {}
    for b in blocks:
        inner = [n for n in layers if n.startswith(b + ".")]
        if not inner:
            continue
        for n in inner:
            block_of[n] = b
        groups[b] = PrunableGroup(
            name=b, kind="block", units=1, allowed=(Structure.NONE, Structure.BLOCK),
            members=tuple(inner), note="residual block with identity shortcut",
        )
    if block_of:
        layers = {
            n: Layer(lay.name, lay.spec, lay.in_segments, lay.out_segments, block_of.get(n))
            for n, lay in layers.items()
        }

    return ModelSpec(
        model_name=model_name or type(model).__name__,
        input_shapes=[tuple(t.shape) for t in inputs],
        layers=layers,
        groups=groups,
        fixed=fixed,
        ignored=tuple(ignore),
    )
