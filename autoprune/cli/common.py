"""Pieces every subcommand shares: the model factory, the input shape, the backend options."""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
from collections.abc import Mapping
from typing import Any

from autoprune.errors import InvalidInputError
from autoprune.io import safe_torch_load


def parse_shape(text: str) -> tuple[int, ...]:
    """"1,3,32,32" (or "1x3x32x32") → (1, 3, 32, 32)."""
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise InvalidInputError(f"--input-shape must be integers like 1,3,32,32, got {text!r}") from None
    if not shape or any(v <= 0 for v in shape):
        raise InvalidInputError(f"--input-shape must be positive integers, got {text!r}")
    return shape


def resolve_factory(factory: str, flag: str = "--model",
                    example: str = "torchvision.models:resnet18") -> Any:
    """The callable named by ``module:callable`` (dotted attributes allowed after the colon);
    errors name ``flag``, the bad value and the expected form."""
    if not isinstance(factory, str) or ":" not in factory:
        raise InvalidInputError(
            f"{flag} must be 'module:callable' (e.g. {example}), got {factory!r}"
        )
    mod_name, attr = factory.split(":", 1)
    if not mod_name or not attr:
        raise InvalidInputError(
            f"{flag} must be 'module:callable' (e.g. {example}), got {factory!r}"
        )
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise InvalidInputError(f"cannot import module {mod_name!r} for {flag}: {e}") from None
    fn: Any = mod
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise InvalidInputError(f"module {mod_name!r} has no attribute {attr!r} ({flag})")
    if not callable(fn):
        raise InvalidInputError(f"{flag} {factory!r} is not callable")
    return fn


def parse_kwargs(kwargs_json: str | None, flag: str = "--model-kwargs") -> dict[str, Any]:
    """A JSON object of keyword arguments (``{}`` when not given)."""
    try:
        kwargs = json.loads(kwargs_json) if kwargs_json else {}
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"{flag} is not valid JSON: {e}") from None
    if not isinstance(kwargs, dict):
        raise InvalidInputError(f"{flag} must be a JSON object, got {kwargs_json!r}")
    return kwargs


def load_model(factory: str, kwargs_json: str | None = None, weights: str | None = None,
               num_classes: int | None = None) -> Any:
    """Build ``module:callable(**kwargs)`` in eval mode, optionally loading a state_dict.

    torchvision factories get ``weights=None`` (nothing is downloaded); ``num_classes`` is a
    shortcut for that keyword; ``weights`` is loaded with ``torch.load(weights_only=True)``.
    """
    fn = resolve_factory(factory, "--model")
    mod_name = factory.split(":", 1)[0]
    kwargs = parse_kwargs(kwargs_json, "--model-kwargs")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    params: Mapping[str, inspect.Parameter]
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    accepts_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
    if "weights" in params or (accepts_kw and mod_name.startswith("torchvision")):
        kwargs.setdefault("weights", None)
    model = fn(**kwargs)
    if weights:
        state = safe_torch_load(weights)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise InvalidInputError(f"--weights {weights} do not fit the model: {e}") from None
    return model.eval()


def add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="onnxruntime-cpu",
                   help="backend name (onnxruntime-cpu, torch-cuda, tensorrt, synthetic)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (onnxruntime-cpu)")
    p.add_argument("--graph-optimization-level", default="all",
                   choices=["disable", "basic", "extended", "layout", "all"])
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="torch-cuda precision")
    p.add_argument("--sparse-weights", action="store_true", help="tensorrt: SPARSE_WEIGHTS")
    p.add_argument("--quick", action="store_true",
                   help="fast, noisier protocol (few runs) for smoke tests")


def backend_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``get_backend`` options the backend-args flags ask for (each backend only its own)."""
    from autoprune.measure import ProtocolSettings

    opts: dict[str, Any] = {}
    if args.quick:
        opts["protocol"] = ProtocolSettings.quick()
    if args.device == "onnxruntime-cpu":
        opts.update(threads=args.threads, graph_optimization_level=args.graph_optimization_level)
    elif args.device == "torch-cuda":
        opts.update(dtype=args.dtype)
    elif args.device == "tensorrt":
        opts.update(fp16=args.dtype == "fp16", sparse_weights=args.sparse_weights)
    return opts


def make_backend(args: argparse.Namespace) -> Any:
    from autoprune.backends import get_backend

    return get_backend(args.device, **backend_options(args))
