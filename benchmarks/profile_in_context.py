"""Per-layer cost in the whole model against the same layer alone, from ONNX Runtime's profiler.

Times every convolution node (per-node kernel times of a profiled session, 1 thread, graph
optimisation "all") in the whole model and in the layer's own micro-model (the table's
measurement unit), and prints them side by side with the layer's weight size. It shows what a
table of isolated layers cannot see: layout reorders (in the micro-model only; see README
"In-context layer timing") and weights a whole model re-reads from beyond the cache on every
layer (the difference grows with the layer's weight bytes, at every input size).

    python benchmarks/profile_in_context.py --model resnet18 --size 64

The profiler inflates small runs, so compare the two columns with each other, not with
un-profiled timings (and repeat: on a shared VM the whole-model column moves between runs).
Convolution nodes are paired with the model's conv layers by the module path in the exported
node names; a conv fused with the activation after it is named after that activation by the
runtime and is left out.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

import numpy as np


def module_path(node_name: str) -> str:
    """The dotted module path of an exported node (``/layer2/layer2.0/downsample/downsample.0/
    Conv`` -> ``layer2.0.downsample.0``): scope segments, a child of a container named
    ``<container>.<index>``."""
    parts: list[str] = []
    for seg in [s for s in node_name.split("/")[:-1] if s]:
        if parts and seg.startswith(parts[-1].rsplit(".", 1)[-1] + "."):
            parts[-1] = parts[-1][: len(parts[-1]) - len(parts[-1].rsplit(".", 1)[-1])] + seg
        else:
            parts.append(seg)
    return ".".join(parts)


def conv_node_ms(onnx_model: bytes, runs: int) -> dict[str, float]:
    """Median kernel time (ms) of every convolution node, by the node's name."""
    from autoprune import bundle_runner as br

    d = tempfile.mkdtemp(prefix="autoprune-prof-")
    sess = br.make_session(onnx_model, profile_prefix=os.path.join(d, "p"))
    call = br.session_timer(sess)
    for _ in range(runs + 5):
        call()
    path = sess.end_profiling()
    with open(path, encoding="utf-8") as f:
        events = json.load(f)
    os.unlink(path)
    os.rmdir(d)
    per: dict[str, list[float]] = collections.defaultdict(list)
    for e in events:
        if (e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                and "Conv" in (e.get("args") or {}).get("op_name", "")):
            per[e["name"]].append(float(e["dur"]))
    return {k[: -len("_kernel_time")]: float(np.median(v[-runs:])) / 1000 for k, v in per.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", help="a torchvision model name")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--runs", type=int, default=30)
    args = p.parse_args()
    import torch

    from autoprune import zoo
    from autoprune._analyze import analyze
    from autoprune.backends.micro import build_micro_model
    from autoprune.onnx_export import to_onnx
    from autoprune.types import OpKind, Structure

    torch.manual_seed(0)
    model = zoo.torchvision_model(args.model, num_classes=10).eval()
    x = torch.randn(1, 3, args.size, args.size)
    spec = analyze(model, (x,))
    convs = [(n, lay) for n, lay in spec.layers.items()
             if lay.spec.op in (OpKind.CONV2D, OpKind.DWCONV2D)]
    whole = {module_path(k): v for k, v in conv_node_ms(to_onnx(model, (x,)), args.runs).items()}
    print(f"{args.model} at {args.size}², profiled, ms per node\n")
    print("| layer | weights (MB) | alone | in the whole model | difference |")
    print("|---|---|---|---|---|")
    tot_alone = tot_whole = 0.0
    for name, lay in convs:
        if name not in whole:
            continue
        micro, inputs = build_micro_model(lay.spec, Structure.NONE, 1.0)
        alone = sum(conv_node_ms(to_onnx(micro, inputs), args.runs).values())
        w = whole[name]
        tot_alone += alone
        tot_whole += w
        print(f"| {name} | {lay.spec.params * 4 / 1e6:.2f} | {alone:.3f} | {w:.3f} | "
              f"{w - alone:+.3f} |")
    print(f"| all paired | | {tot_alone:.3f} | {tot_whole:.3f} | {tot_whole - tot_alone:+.3f} |")


if __name__ == "__main__":
    main()
