"""``autoprune profile``: measure a model's per-layer latency table on a device.

Example::

    autoprune profile --model torchvision.models:resnet18 --input-shape 1,3,32,32 \\
        --device onnxruntime-cpu --threads 1 --root latency_tables
"""

from __future__ import annotations

import argparse
import importlib
import inspect
from typing import Any

from autoprune.errors import InvalidInputError


def parse_shape(text: str) -> tuple[int, ...]:
    """"1,3,32,32" → (1, 3, 32, 32)."""
    try:
        shape = tuple(int(x) for x in text.replace("x", ",").split(",") if x.strip())
    except ValueError:
        raise InvalidInputError(f"--input-shape {text!r}: use comma-separated integers, e.g. 1,3,32,32") from None
    if not shape or any(d < 1 for d in shape):
        raise InvalidInputError(f"--input-shape {text!r}: every dimension must be >= 1")
    return shape


def load_model(factory: str, num_classes: int | None = None) -> Any:
    """Build a model from "module:function" (torchvision factories get ``weights=None``)."""
    mod_name, sep, fn_name = factory.partition(":")
    if not sep or not mod_name or not fn_name:
        raise InvalidInputError(
            f"--model {factory!r}: use an importable factory 'module:function', e.g. "
            "torchvision.models:resnet18 or autoprune.zoo:conv1d_net"
        )
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise InvalidInputError(f"--model {factory!r}: cannot import {mod_name!r} ({e})") from None
    fn = getattr(mod, fn_name, None)
    if fn is None or not callable(fn):
        raise InvalidInputError(f"--model {factory!r}: {mod_name} has no callable {fn_name!r}")
    kwargs: dict[str, Any] = {}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    accepts_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
    if "weights" in params or (accepts_kw and mod_name.startswith("torchvision")):
        kwargs["weights"] = None
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = fn(**kwargs)
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


def make_backend(args: argparse.Namespace) -> Any:
    from autoprune.backends import get_backend
    from autoprune.measure import ProtocolSettings

    protocol = ProtocolSettings.quick() if args.quick else ProtocolSettings()
    opts: dict[str, Any] = {"protocol": protocol}
    if args.device == "onnxruntime-cpu":
        opts.update(threads=args.threads, graph_optimization_level=args.graph_optimization_level)
    elif args.device == "torch-cuda":
        opts.update(dtype=args.dtype)
    elif args.device == "tensorrt":
        opts.update(fp16=args.dtype == "fp16", sparse_weights=args.sparse_weights)
    return get_backend(args.device, **opts)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "profile", help="measure a model's per-layer latency table on a device",
        description="Measure every layer of a model at the widths the search may choose; "
                    "resumable (rerun to continue an interrupted run).",
    )
    p.add_argument("--model", required=True, help="factory 'module:function'")
    p.add_argument("--input-shape", required=True, help="e.g. 1,3,32,32")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--root", default="latency_tables", help="table root directory")
    p.add_argument("--widths", default="auto", help="auto | fine | full | comma-separated ratios")
    p.add_argument("--max-entries", type=int, default=None)
    p.add_argument("--alignment", type=int, default=None, help="skip detection, use this step")
    p.add_argument("--notes", default=None, help="free text stored in the table sidecar")
    p.add_argument("--no-progress", action="store_true")
    add_backend_args(p)
    p.set_defaults(func=run)


def parse_widths(text: str) -> Any:
    if text in ("auto", "fine", "full"):
        return text
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise InvalidInputError(f"--widths {text!r}: use auto, fine, full or ratios like 0.25,0.5") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from autoprune.profiler import profile

    model = load_model(args.model, args.num_classes)
    x = torch.randn(parse_shape(args.input_shape))
    backend = make_backend(args)
    table = profile(model, x, backend, root=args.root, widths=parse_widths(args.widths),
                    progress=not args.no_progress, max_entries=args.max_entries,
                    alignment=args.alignment)
    if args.notes is not None:
        table.notes = args.notes
        table.save()
    print(f"{table!r} -> {table.path}")
    return 0
