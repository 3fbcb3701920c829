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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from autoprune._tpglue import (
    _WEIGHT_LAYERS,
    Graphs,
    _inputs_error,
    build_graphs,
    check_channel_groups,
    custom_param_modules,
    functional_weight_modules,
    normalize_inputs,
)
from autoprune.errors import InvalidInputError, UnsupportedLayerError
from autoprune.types import Layer, LayerSpec, ModelSpec, OpKind, PrunableGroup, Structure

__all__ = [
    "NM_MULTIPLE",
    "Graphs",
    "analyze",
    "build_graphs",
    "custom_param_modules",
    "functional_weight_modules",
    "normalize_inputs",
]

#: nm is offered on a group only if every producer's input width per group is a multiple of this
NM_MULTIPLE = 4

_UNSUPPORTED_WEIGHT_LAYERS = (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

# autograd node names (without the trailing version digit) -> fused op name
_ACT_NODES = {
    "ReluBackward": "relu",
    "HardtanhBackward": "relu6",
    "HardswishBackward": "hardswish",
    "HardsigmoidBackward": "hardsigmoid",
    "SiluBackward": "silu",
    "GeluBackward": "gelu",
    "SigmoidBackward": "sigmoid",
    "TanhBackward": "tanh",
    "LeakyReluBackward": "leaky_relu",
    "EluBackward": "elu",
}
_BN_NODES = ("NativeBatchNormBackward", "CudnnBatchNormBackward", "BatchNormBackward")
_ADD_NODES = ("AddBackward",)


def _node_kind(fn: Any) -> str:
    return type(fn).__name__.rstrip("0123456789")


@dataclass
class _Record:
    """What the forward hooks saw for one weighted layer."""

    module: nn.Module
    input_shape: tuple[int, ...]
    dtype: torch.dtype
    out_fn: Any  # grad_fn of the output (for fusion detection)
    batch_first: bool = True


@dataclass
class _Trace:
    records: dict[str, _Record] = field(default_factory=dict)
    # non-leaf module path -> (input tensor grad_fn or None, output grad_fn, in shape, out shape)
    blocks: dict[str, tuple[Any, Any, tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    output_fns: list[Any] = field(default_factory=list)


def _first_tensor(xs: Any) -> torch.Tensor | None:
    if isinstance(xs, torch.Tensor):
        return xs
    if isinstance(xs, (tuple, list)):
        for x in xs:
            t = _first_tensor(x)
            if t is not None:
                return t
    return None


def _trace_forward(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> _Trace:
    trace = _Trace()
    names = {m: n for n, m in model.named_modules()}
    handles = []

    def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        name = names[module]
        trace.calls[name] = trace.calls.get(name, 0) + 1
        if trace.calls[name] > 1:
            return
        x = _first_tensor(args) if args else _first_tensor(list(kwargs.values()))
        out = _first_tensor(output)
        if x is None or out is None:
            return
        if isinstance(module, _WEIGHT_LAYERS) or isinstance(module, nn.MultiheadAttention):
            bf = bool(getattr(module, "batch_first", True))
            trace.records[name] = _Record(module, tuple(x.shape), x.dtype, out.grad_fn, bf)
        elif name and any(True for _ in module.children()):
            trace.blocks[name] = (x.grad_fn, out.grad_fn, tuple(x.shape), tuple(out.shape))

    for m in model.modules():
        handles.append(m.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.enable_grad():
            out = model(*inputs)
    except Exception as e:  # noqa: BLE001 - the user's inputs do not fit the model
        raise _inputs_error(model, inputs, e) from e
    finally:
        for h in handles:
            h.remove()
    stack = [out]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            if o.grad_fn is not None:
                trace.output_fns.append(o.grad_fn)
        elif isinstance(o, (tuple, list)):
            stack.extend(o)
        elif isinstance(o, dict):
            stack.extend(o.values())
    return trace


def _consumers(output_fns: list[Any]) -> dict[Any, list[Any]]:
    """Autograd node -> nodes that consume its output (reverse of next_functions)."""
    cons: dict[Any, list[Any]] = {}
    seen = set()
    stack = list(output_fns)
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        for nxt, _ in getattr(fn, "next_functions", ()):
            if nxt is None:
                continue
            cons.setdefault(nxt, []).append(fn)
            stack.append(nxt)
    return cons


def _fused_after(fn: Any, cons: dict[Any, list[Any]]) -> str:
    """The ops a runtime typically fuses after a conv/linear: bn, add, one activation."""
    ops: list[str] = []
    cur = fn
    for _ in range(4):
        nxt = cons.get(cur, [])
        if len(nxt) != 1:
            break
        k = _node_kind(nxt[0])
        if k in _BN_NODES and not ops:
            ops.append("bn")
        elif k in _ADD_NODES and "add" not in ops and not any(o in _ACT_NODES.values() for o in ops):
            ops.append("add")
        elif k in _ACT_NODES:
            ops.append(_ACT_NODES[k])
            break
        else:
            break
        cur = nxt[0]
    return "+".join(ops)


def _is_identity_residual(in_fn: Any, out_fn: Any) -> bool:
    """True if the output reaches the input's autograd node through adds (and activations)
    only, with at least one add: a residual block whose shortcut is the identity."""
    if in_fn is None or out_fn is None:
        return False
    stack = [(out_fn, False)]
    seen = set()
    while stack:
        fn, through_add = stack.pop()
        if fn is in_fn:
            if through_add:
                return True
            continue
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        k = _node_kind(fn)
        if k in _ADD_NODES:
            for nxt, _ in fn.next_functions:
                stack.append((nxt, True))
        elif k in _ACT_NODES and through_add is False:
            for nxt, _ in fn.next_functions:
                stack.append((nxt, False))
        elif k in _ACT_NODES:
            for nxt, _ in fn.next_functions:
                stack.append((nxt, True))
    return False


def _op_kind(module: nn.Module) -> OpKind:
    if isinstance(module, nn.Linear):
        return OpKind.LINEAR
    dw = module.groups == module.in_channels == module.out_channels and module.groups > 1
    if isinstance(module, nn.Conv1d):
        return OpKind.DWCONV1D if dw else OpKind.CONV1D
    return OpKind.DWCONV2D if dw else OpKind.CONV2D


def _layer_spec(rec: _Record, fused: str) -> LayerSpec:
    m = rec.module
    shape = rec.input_shape
    dtype = str(rec.dtype).replace("torch.", "")
    if isinstance(m, nn.Linear):
        batch = shape[0] if len(shape) >= 2 else 1
        return LayerSpec(
            op=OpKind.LINEAR, in_channels=m.in_features, out_channels=m.out_features,
            input_size=tuple(shape[1:-1]), batch=batch, dtype=dtype, bias=m.bias is not None,
            fused=fused,
        )
    nd = 1 if isinstance(m, nn.Conv1d) else 2
    pad = m.padding
    if isinstance(pad, str):  # "same" / "valid"
        if pad == "valid":
            pad = (0,) * nd
        else:
            pad = tuple(d * (k - 1) // 2 for k, d in zip(m.kernel_size, m.dilation))
    return LayerSpec(
        op=_op_kind(m), in_channels=m.in_channels, out_channels=m.out_channels,
        kernel=tuple(m.kernel_size), stride=tuple(m.stride), padding=tuple(pad),
        dilation=tuple(m.dilation), groups=m.groups, input_size=tuple(shape[2:]),
        batch=shape[0], dtype=dtype, bias=m.bias is not None, fused=fused,
    )


def _segments(labels: list[str | None]) -> tuple[tuple[str | None, int], ...]:
    """Channel labels -> segments, one per group in order of first appearance (a group whose
    channels are interleaved with others still gets one segment with its total count)."""
    counts: dict[str | None, int] = {}
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    return tuple((k, v) for k, v in counts.items())


def _order_of(path: str, order: dict[str, int]) -> tuple[int, int]:
    """Position of a layer in ``named_modules`` order (attention sub-layers after their module)."""
    base, _, suffix = path.rpartition(".")
    sub = {"in_proj": 1, "attention": 2, "out_proj": 3}.get(suffix)
    if sub is not None and base in order:
        return order[base], sub
    return order.get(path, len(order)), 0


def _is_unit_partition(units: int, d: int) -> bool:
    return d >= 1 and units % d == 0


def analyze(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    ignore: Sequence[str] | None = None,
    model_name: str | None = None,
    check: bool = True,
) -> ModelSpec:
    """Find the prunable groups and the layer shapes of ``model``.

    Args:
        model: any ``nn.Module``; it is not modified (its train/eval mode is restored).
        example_inputs: a tensor or tuple of tensors, at the batch size and input size the
            model will be deployed with (layer shapes are measured from them).
        ignore: module paths to keep unpruned (each is warned about). A module autoprune cannot
            handle raises ``UnsupportedLayerError`` unless it is listed here.
        model_name: name recorded in the spec (default: the class name).
        check: prune one unit of every channel group on a copy and run it, so that only groups
            torch-pruning can really remove are offered ``channel``.

    Returns:
        a ``ModelSpec``; channel groups are named after their first producing layer.
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = normalize_inputs(example_inputs)
    ignore = list(ignore or [])
    modules = dict(model.named_modules())
    for path in ignore:
        if path not in modules:
            raise InvalidInputError(
                f"ignore path {path!r} is not a module of {type(model).__name__}; "
                f"examples of paths: {', '.join(list(modules)[1:6])}"
            )
    ignored_modules: list[nn.Module] = []
    for path in ignore:
        ignored_modules.extend(modules[path].modules())
    ignored_ids = {id(m) for m in ignored_modules}
    names = {m: n for n, m in modules.items()}

    for path, m in modules.items():
        if isinstance(m, _UNSUPPORTED_WEIGHT_LAYERS) and id(m) not in ignored_ids:
            raise UnsupportedLayerError(
                path, type(m).__name__, "3-D and transposed convolutions are not modelled"
            )
    for path in ignore:
        warnings.warn(
            f"analyze: module {path!r} ({type(modules[path]).__name__}) is ignored: its channels "
            "and every group coupled to them stay unpruned",
            stacklevel=2,
        )

    was_training = model.training
    model.eval()
    try:
        trace = _trace_forward(model, inputs)
        for path in functional_weight_modules(model, trace.calls):
            if not any(path == p or path.startswith(p + ".") for p in ignore):
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
            spec = check_channel_groups(model, inputs, spec, ignore)
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


def _build_spec(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    trace: _Trace,
    graphs: Graphs,
    names: dict[nn.Module, str],
    ignored_ids: set[int],
    ignore: list[str],
    model_name: str | None,
) -> ModelSpec:
    fixed: dict[str, str] = {}
    for path in ignore:
        fixed[path] = "ignored by the user (ignore=...)"

    # --- layers seen in the forward pass ------------------------------------------------
    records = trace.records
    mha_paths = [n for n, r in records.items() if isinstance(r.module, nn.MultiheadAttention)]
    # weighted layers: path -> module (an MHA contributes in_proj, out_proj and attention)
    in_labels: dict[str, list[str | None]] = {}
    out_labels: dict[str, list[str | None]] = {}
    layer_mods: dict[str, nn.Module] = {}
    for n, r in records.items():
        if isinstance(r.module, nn.MultiheadAttention):
            continue
        if any(n.startswith(p + ".") for p in mha_paths):
            continue  # out_proj of an attention module is handled with it
        if id(r.module) in ignored_ids:
            continue
        layer_mods[n] = r.module
        cin = r.module.in_features if isinstance(r.module, nn.Linear) else r.module.in_channels
        cout = r.module.out_features if isinstance(r.module, nn.Linear) else r.module.out_channels
        in_labels[n] = [None] * cin
        out_labels[n] = [None] * cout
    for p in mha_paths:
        mha = records[p].module
        if id(mha) in ignored_ids:
            continue
        e = mha.embed_dim
        if mha.kdim != e or mha.vdim != e or mha.in_proj_weight is None:
            raise UnsupportedLayerError(
                p, type(mha).__name__, "attention with separate key/value widths is not modelled"
            )
        for suffix, cin, cout in (("in_proj", e, 3 * e), ("out_proj", e, e), ("attention", e, e)):
            in_labels[f"{p}.{suffix}"] = [None] * cin
            out_labels[f"{p}.{suffix}"] = [None] * cout

    # --- channel groups from torch-pruning -----------------------------------------------
    order = {n: i for i, n in enumerate(names.values())}
    groups: dict[str, PrunableGroup] = {}
    group_divisor: dict[str, int] = {}
    raw_groups = [
        (prefix, dg, g)
        for prefix, dg in graphs.graphs.items()
        for g in dg.get_all_groups(
            ignored_layers=[m for m in model.modules() if id(m) in ignored_ids],
            root_module_types=(nn.Conv1d, nn.Conv2d, nn.Linear),
        )
    ]
    pending: list[tuple[list[tuple[str, str, list[int]]], int, set[str], str]] = []
    for prefix, dg, g in raw_groups:
        units = len(g[0].idxs)
        touched: list[tuple[str, str, list[int]]] = []  # (layer path, "in"/"out", idxs)
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
            is_out = dg.is_out_channel_pruning_fn(dep.handler)
            is_in = dg.is_in_channel_pruning_fn(dep.handler)
            if isinstance(mod, nn.MultiheadAttention):
                consumed = True
                for suffix in ("in_proj", "out_proj", "attention"):
                    touched.append((f"{path}.{suffix}", "mha", idxs))
                continue
            if path not in layer_mods:
                continue
            if is_in and not is_out:
                consumed = True
                touched.append((path, "in", idxs))
            elif isinstance(mod, (nn.Conv1d, nn.Conv2d)) and _op_kind(mod).is_depthwise:
                consumed = True
                touched.append((path, "in", idxs))
                touched.append((path, "out", idxs))
            elif is_out:
                touched.append((path, "out", idxs))
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
            {p for p, side, _ in touched if side in ("out", "mha")
             and not (p in layer_mods and _op_kind(layer_mods[p]).is_depthwise)
             and not p.endswith(".attention")},
            key=lambda p: _order_of(p, order),
        )
        if not producers:
            continue
        name = producers[0]
        if name in used_names:  # should not happen; keep names unique anyway
            name = f"{name}#{len(used_names)}"
        used_names.add(name)
        # unit partition: grouped convolutions and attention heads must shrink evenly
        d = 1
        for p, side, idxs in touched:
            if side == "mha":
                mha = records[p.rsplit(".", 1)[0]].module
                d = math.lcm(d, mha.num_heads)
            elif p in layer_mods and isinstance(layer_mods[p], (nn.Conv1d, nn.Conv2d)):
                m = layer_mods[p]
                if 1 < m.groups and not _op_kind(m).is_depthwise:
                    d = math.lcm(d, m.groups)
        for p, side, idxs in touched:
            if side == "mha":
                for i in range(len(in_labels[p])):
                    in_labels[p][i] = name
                for i in range(len(out_labels[p])):
                    out_labels[p][i] = name
                continue
            lab = in_labels[p] if side == "in" else out_labels[p]
            for i in idxs:
                lab[i] = name
        group_divisor[name] = d
        if why_fixed:
            mask_only[name] = why_fixed
        groups[name] = PrunableGroup(
            name=name, kind="channel", units=units, allowed=(Structure.NONE,),
            producers=tuple(producers), members=tuple(sorted(members, key=lambda p: order.get(p, 0))),
        )

    groups = dict(sorted(groups.items(), key=lambda kv: _order_of(kv[0], order)))

    # --- layers ---------------------------------------------------------------------------
    cons = _consumers(trace.output_fns)
    layers: dict[str, Layer] = {}
    for n in sorted(in_labels, key=lambda p: _order_of(p, order)):
        base = n.rsplit(".", 1)[0]
        if n in layer_mods:
            rec = records[n]
            spec = _layer_spec(rec, _fused_after(rec.out_fn, cons))
        else:
            rec = records[base]
            mha = rec.module
            shape = rec.input_shape
            batch, seq = (shape[0], shape[1]) if rec.batch_first else (shape[1], shape[0])
            e = mha.embed_dim
            dtype = str(rec.dtype).replace("torch.", "")
            suffix = n.rsplit(".", 1)[1]
            if suffix == "attention":
                spec = LayerSpec(OpKind.ATTENTION, e, e, groups=mha.num_heads, input_size=(seq,),
                                 batch=batch, dtype=dtype, bias=False)
            elif suffix == "in_proj":
                spec = LayerSpec(OpKind.LINEAR, e, 3 * e, input_size=(seq,), batch=batch,
                                 dtype=dtype, bias=mha.in_proj_bias is not None)
            else:
                spec = LayerSpec(OpKind.LINEAR, e, e, input_size=(seq,), batch=batch,
                                 dtype=dtype, bias=mha.out_proj.bias is not None)
        layers[n] = Layer(n, spec, _segments(in_labels[n]), _segments(out_labels[n]))

    # model input channels: layers whose input channels no group controls and that read a
    # model input directly
    for n, lay in layers.items():
        if all(g is None for g, _ in lay.in_segments) and n in layer_mods:
            rec = records[n]
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
        if _is_identity_residual(in_fn, out_fn):
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
    )


