"""``autoprune export``: write the pruned model of a finished run to ONNX (and TensorRT).

    autoprune export --run-dir runs/resnet18 --model torchvision.models:resnet18 \\
        --model-kwargs '{"num_classes": 10}' --input-shape 1,3,32,32 --onnx resnet18_pruned.onnx \\
        [--tensorrt resnet18.plan]   # needs TensorRT and an NVIDIA GPU

The pruned model is rebuilt from the dense factory, the run's ``plan.json`` and ``pruned.pt``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export", help="export a run's pruned model to ONNX / a TensorRT engine",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run-dir", required=True)
    p.add_argument("--model", required=True, help="the dense model's factory, module:callable")
    p.add_argument("--model-kwargs", default=None)
    p.add_argument("--input-shape", required=True)
    p.add_argument("--onnx", default=None, help="ONNX output path (default: <run-dir>/model.onnx)")
    p.add_argument("--opset", type=int, default=None)
    p.add_argument("--tensorrt", default=None, help="also build a TensorRT engine at this path")
    p.add_argument("--no-fp16", action="store_true")
    p.add_argument("--no-sparse", action="store_true", help="do not enable SPARSE_WEIGHTS")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import torch

    from autoprune.cli.common import load_model, parse_shape
    from autoprune.export import export_onnx, export_tensorrt, onnx_nm_report
    from autoprune.pipeline import load_pruned

    shape = parse_shape(args.input_shape)
    example = (torch.randn(*shape),)
    dense = load_model(args.model, args.model_kwargs)
    pruned = load_pruned(dense, args.run_dir, example)
    out = Path(args.onnx) if args.onnx else Path(args.run_dir) / "model.onnx"
    export_onnx(pruned, example, out, opset=args.opset)
    nm = onnx_nm_report(out)
    print(f"wrote {out} ({sum(nm.values())} of {len(nm)} weight tensors follow 2:4)")
    if args.tensorrt:
        engine = export_tensorrt(out, args.tensorrt, fp16=not args.no_fp16,
                                 sparse_weights=not args.no_sparse)
        print(f"wrote {engine}")
    return 0
