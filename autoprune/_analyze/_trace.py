"""The one real forward pass ``analyze`` learns layer shapes from, and what the autograd graph
of that pass says: the ops a runtime fuses after a layer, and which blocks are residual with an
identity shortcut."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from autoprune._analyze._adapters import ADAPTERS
from autoprune._analyze._tpglue import _inputs_error

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


def node_kind(fn: Any) -> str:
    return type(fn).__name__.rstrip("0123456789")


@dataclass
class Record:
    """What the forward hooks saw for one weighted layer."""

    module: nn.Module
    input_shape: tuple[int, ...]
    dtype: torch.dtype
    out_fn: Any  # grad_fn of the output (for fusion detection)


@dataclass
class Trace:
    records: dict[str, Record] = field(default_factory=dict)
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


def trace_forward(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Trace:
    trace = Trace()
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
        if ADAPTERS.layer(module) is not None:
            trace.records[name] = Record(module, tuple(x.shape), x.dtype, out.grad_fn)
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


def consumers(output_fns: list[Any]) -> dict[Any, list[Any]]:
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


def fused_after(fn: Any, cons: dict[Any, list[Any]]) -> str:
    """The ops a runtime typically fuses after a conv/linear: bn, add, one activation."""
    ops: list[str] = []
    cur = fn
    for _ in range(4):
        nxt = cons.get(cur, [])
        if len(nxt) != 1:
            break
        k = node_kind(nxt[0])
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


def is_identity_residual(in_fn: Any, out_fn: Any) -> bool:
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
        k = node_kind(fn)
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
