"""``autoprune bundle export|import``: profile a device that cannot run autoprune itself.

    autoprune bundle export --model torchvision.models:resnet18 --input-shape 1,3,32,32 \\
        --out bundle_r18 [--alignment 16]
    # on the device (needs python, numpy, onnxruntime):  python run_bundle.py --threads 1
    autoprune bundle import bundle_r18/results_t1.json --root latency_tables
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("bundle", help="export/import a latency bundle for a remote device")
    sub = p.add_subparsers(dest="bundle_command", required=True)
    e = sub.add_parser("export", help="write micro-models + manifest + standalone runner")
    e.add_argument("--model", required=True, help="factory 'module:function'")
    e.add_argument("--input-shape", required=True)
    e.add_argument("--num-classes", type=int, default=None)
    e.add_argument("--out", required=True, help="bundle directory")
    e.add_argument("--widths", default="auto")
    e.add_argument("--alignment", type=int, default=None,
                   help="channel step of the target; default: detect from a sweep in the bundle")
    e.add_argument("--quick", action="store_true", help="fast, noisier protocol")
    e.add_argument("--no-weight-stream", action="store_true",
                   help="leave out the weight-streaming probe chains (0.5-128 MB of weights, "
                        "timed together: about 10 s and 2.3 GB of memory on a desktop core; "
                        "minutes on a small board or an emulator)")
    e.set_defaults(func=run_export)
    i = sub.add_parser("import", help="turn a runner's results.json into a latency table")
    i.add_argument("results", help="results JSON written by run_bundle.py")
    i.add_argument("--root", default="latency_tables")
    i.add_argument("--no-save", action="store_true")
    i.set_defaults(func=run_import)


def run_export(args: argparse.Namespace) -> int:
    import torch

    from autoprune.bundle import export_bundle
    from autoprune.cli.common import load_model, parse_shape
    from autoprune.cli.profile import parse_widths
    from autoprune.latency._memory import PROBE_SIZES_MB
    from autoprune.measure import ProtocolSettings

    model = load_model(args.model, num_classes=args.num_classes)
    x = torch.randn(parse_shape(args.input_shape))
    manifest = export_bundle(
        model, x, args.out, widths=parse_widths(args.widths), alignment=args.alignment,
        protocol=ProtocolSettings.quick() if args.quick else None,
        weight_stream_sizes=() if args.no_weight_stream else PROBE_SIZES_MB,
    )
    print(f"bundle written: {manifest.parent} (run: python {manifest.parent}/run_bundle.py "
          "--threads 1)")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from autoprune.bundle import import_bundle

    table = import_bundle(args.results)
    if not args.no_save:
        from autoprune.latency._table import LatencyTable

        d = LatencyTable.default_dir(table.device, args.root)
        if (d / "table.json").exists():
            table = LatencyTable.load(d, expect_device=table.device).merge(table)
        table.save(d)
    from autoprune.bundle import device_label

    print(f"{table!r}" + ("" if args.no_save else f" -> {table.path}"))
    print(f"measured on {device_label(table.device)}")
    if table.kernel_rules is not None:
        print(f"device kernel rules: {table.kernel_rules}")
    return 0
