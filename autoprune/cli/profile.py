"""``autoprune profile``: measure a model's per-layer latency table on a device.

Example::

    autoprune profile --model torchvision.models:resnet18 --input-shape 1,3,32,32 \\
        --device onnxruntime-cpu --threads 1 --root latency_tables
"""

from __future__ import annotations

import argparse
from typing import Any

from autoprune.cli.common import add_backend_args, load_model, make_backend, parse_shape
from autoprune.errors import InvalidInputError


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

    from autoprune.latency._profile import profile

    model = load_model(args.model, num_classes=args.num_classes)
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
