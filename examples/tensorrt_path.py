"""The TensorRT path: prune for an NVIDIA GPU, with 2:4 where TensorRT picks sparse kernels.

*** Needs an NVIDIA GPU (sm_80 or newer for 2:4 sparse kernels) and TensorRT 10
    (pip install tensorrt). Without them this script says what is missing and exits (code 2). ***

    python examples/tensorrt_path.py [--budget-fraction 0.6]

Steps: train a ResNet-18 on digits (GPU, a few seconds) → run_pipeline on the ``tensorrt``
backend (FP16, ``SPARSE_WEIGHTS`` on, so the search may offer ``nm`` 2:4 on layers where the
table shows TensorRT faster with it) → export ONNX (2:4 weights keep their pattern) → build the
engine with ``export_tensorrt`` and print which layers TensorRT actually ran sparse.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _missing() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (pip install tensorrt; it needs an NVIDIA GPU with CUDA)"
    import torch

    if not torch.cuda.is_available():
        return "no NVIDIA GPU is visible to PyTorch (torch.cuda.is_available() is False)"
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-fraction", type=float, default=0.6)
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--run-dir", default="runs/tensorrt")
    args = p.parse_args()
    why = _missing()
    if why is not None:
        print(f"examples/tensorrt_path.py needs an NVIDIA GPU and TensorRT: {why}.\n"
              "On a CPU-only machine use examples/quickstart.py (ONNX Runtime CPU).",
              file=sys.stderr)
        return 2

    import torch

    import autoprune as ap
    from autoprune._finetune import finetune
    from autoprune.data import digits_loaders
    from autoprune.export import export_tensorrt, onnx_nm_report
    from autoprune.zoo import torchvision_model

    torch.manual_seed(0)
    run_dir = Path(args.run_dir)
    train_loader, test_loader = digits_loaders(size=64, channels=3, batch_size=128)
    model = torchvision_model("resnet18", num_classes=10)
    finetune(model, train_loader, epochs=5, lr=0.05, device="cuda")
    model = model.cpu().eval()

    report = ap.run_pipeline(
        model, torch.randn(8, 3, 64, 64), budget_fraction=args.budget_fraction,
        device="tensorrt", backend_options={"fp16": True, "sparse_weights": True},
        run_dir=run_dir, train_loader=train_loader, val_loader=test_loader,
        n_trials=args.trials, finetune_epochs=3, train_device="cuda",
    )
    print(report)
    nm = onnx_nm_report(run_dir / "model.onnx")
    print(f"{sum(nm.values())} of {len(nm)} weight tensors are 2:4 in the exported ONNX")
    engine = export_tensorrt(run_dir / "model.onnx", run_dir / "model.plan", fp16=True,
                             sparse_weights=True)
    sparsity = json.loads(Path(f"{engine}.sparsity.json").read_text())
    print(f"engine: {engine}; TensorRT layers eligible for sparse math: "
          f"{len(sparsity['eligible'])}, that picked a sparse kernel: {len(sparsity['picked'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
