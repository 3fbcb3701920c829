"""The one place autoprune exports a PyTorch module to ONNX.

With torch 2.14 the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) still
works and is several times faster than the ``torch.export``-based one for the small
micro-models the profiler builds (about 0.03 s against 1-2 s), so it is tried first; if it
fails (a model it cannot trace) the dynamo exporter (needs ``onnxscript``) is used.
Masked models (``weight_mask`` buffers, ``autoprune.masks``) are baked on a copy first so the
exported weights carry the zeros.
"""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoprune.errors import AutoPruneError
from autoprune.io import atomic_write_bytes

DEFAULT_OPSET = 17


class ExportError(AutoPruneError):
    """Both ONNX exporters failed; the message carries both errors."""


def as_input_tuple(example_inputs: Any) -> tuple[Any, ...]:
    """Normalise ``example_inputs`` (a tensor, a tuple/list of tensors) to a tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    if isinstance(example_inputs, dict):
        raise ExportError("dict example_inputs are not supported; pass a tuple of tensors")
    return (example_inputs,)


def has_masks(model: nn.Module) -> bool:
    return any(name.endswith("weight_mask") for name, _ in model.named_buffers())


def bake_if_masked(model: nn.Module) -> nn.Module:
    """A copy with masks folded into the weights (``autoprune.masks.bake``); the model itself
    if it carries no mask."""
    if not has_masks(model):
        return model
    try:
        from autoprune import masks
    except ImportError as e:  # pragma: no cover - masks.py lands with the executor issue
        raise ExportError(
            "the model carries weight_mask buffers but autoprune.masks is not available to "
            "bake them before export"
        ) from e
    baked = copy.deepcopy(model)
    out = masks.bake(baked)
    return out if isinstance(out, nn.Module) else baked


def to_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | Path | None = None,
    opset: int | None = None,
    input_names: list[str] | None = None,
) -> bytes | Path:
    """Export ``model`` (in eval mode) to ONNX; bytes if ``path`` is None, else the path.

    Written atomically through ``autoprune.io`` when ``path`` is given.
    """
    args = as_input_tuple(example_inputs)
    model = bake_if_masked(model)
    was_training = model.training
    model.eval()
    opset = opset or DEFAULT_OPSET
    names = input_names or [f"input{i}" for i in range(len(args))]
    try:
        data = _export_torchscript(model, args, opset, names)
    except Exception as first:  # noqa: BLE001 - fall back to the other exporter
        try:
            data = _export_dynamo(model, args, opset, names)
        except Exception as second:  # noqa: BLE001
            raise ExportError(
                f"ONNX export of {type(model).__name__} failed with both exporters: "
                f"torchscript: {type(first).__name__}: {first}; "
                f"dynamo: {type(second).__name__}: {second}"
            ) from second
    finally:
        model.train(was_training)
    if path is None:
        return data

    return atomic_write_bytes(path, data)


def _export_torchscript(model: nn.Module, args: tuple[Any, ...], opset: int,
                        names: list[str]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, args, buf,  # type: ignore[arg-type]  # the torchscript exporter takes a buffer
            opset_version=opset, input_names=names, dynamo=False,
            do_constant_folding=True,
        )
    return buf.getvalue()


def _export_dynamo(model: nn.Module, args: tuple[Any, ...], opset: int,
                   names: list[str]) -> bytes:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, args, dynamo=True, opset_version=max(opset, 18), input_names=names,
            verbose=False,
        )
    data: bytes = program.model_proto.SerializeToString()  # type: ignore[union-attr]
    return data
