"""Profile a device you cannot install autoprune on (an ARM board) with a latency bundle.

    python examples/remote_arm_bundle.py

On a real board the middle step runs there:

    scp -r runs/arm_bundle/bundle board:~/bundle
    ssh board 'python3 ~/bundle/run_bundle.py --threads 1'     # needs numpy + onnxruntime only
    scp board:~/bundle/results_t1.json runs/arm_bundle/bundle/

This example runs the bundle's standalone runner locally, in a separate Python process, as a
stand-in for the board, then imports the results as a ``LatencyTable`` (with the device's own
fingerprint) and uses it to estimate plans. The command-line equivalent is
``autoprune bundle export`` / ``autoprune bundle import``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

import autoprune as ap
from autoprune.bundle import export_bundle, import_bundle
from autoprune.zoo import torchvision_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/arm_bundle")
    p.add_argument("--alignment", type=int, default=None,
                   help="the board's channel step if known (else the bundle detects it)")
    args = p.parse_args()
    t0 = time.perf_counter()
    out = Path(args.out)
    model = torchvision_model("mobilenet_v2", num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    spec = ap.analyze(model, x)

    # 1. on this machine: one small ONNX model per table entry + a standalone runner
    manifest = export_bundle(model, x, out / "bundle", spec=spec, alignment=args.alignment,
                             progress=False)
    n_models = len(list((out / "bundle" / "models").glob("*.onnx.gz")))
    size_kb = sum(f.stat().st_size for f in (out / "bundle").rglob("*") if f.is_file()) / 1024
    print(f"bundle: {manifest.parent} ({n_models} micro-models, {size_kb:.0f} KB)")

    # 2. "on the board": the runner needs only python, numpy and onnxruntime
    cmd = [sys.executable, str(out / "bundle" / "run_bundle.py"), str(out / "bundle"),
           "--threads", "1", "--quiet"]
    print("running on the stand-in board:", " ".join(cmd))
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    results = Path(res.stdout.strip().splitlines()[-1])
    print(f"results: {results}")

    # 3. back home: the results become a latency table of that device
    table = import_bundle(results)
    print(f"imported table: {len(table)} entries for device {table.device.device_id}")
    for keep in (1.0, 0.75, 0.5):
        plan = (ap.PruningPlan.dense(spec) if keep == 1.0 else
                ap.PruningPlan.uniform(spec, keep_ratio=keep, alignment=16))
        total = sum(table.lookup(pl.spec, pl.structure, pl.density, policy="interpolate")
                    for pl in spec.pruned_layers(plan))
        print(f"  uniform keep {keep:.2f}: sum of layer latencies on the board {total:.4g} ms")
    print("next: search with this table, e.g. ap.search(model, x, table=table, predictor=...), "
          "where the predictor is fitted on whole-model timings from the board "
          f"(finished in {time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
