"""Per-layer cost in the whole model against the same layer alone, from ONNX Runtime's profiler.

Times every node (per-node kernel times of a profiled session, 1 thread, graph optimisation
"all") of the whole model and of each layer's own micro-model (the table's measurement unit),
and prints the time per op type (convolutions, layout reorders, ...) both ways, then every
convolution node of the whole model beside the same convolution alone, with the layer's weight
size. It shows what a table of isolated layers cannot see: layout reorders (in the micro-model only; see README
"In-context layer timing") and weights a whole model re-reads from beyond the cache on every
layer (the difference grows with the layer's weight bytes, at every input size).

    python benchmarks/profile_in_context.py --model resnet18 --size 64
    python benchmarks/profile_in_context.py --model mobilenet_v2 --size 224 --keep 0.6 --alignment 16
    python benchmarks/profile_in_context.py --model regnet_x_400mf --size 64 \
        --plan runs/bp64/tables/DEVICE/predictor_RegNet_HASH.csv:30 --table runs/bp64/tables/DEVICE

``--plan CSV:ROW`` profiles a plan a ``bench_predictor.py`` campaign measured (row ROW of its
dataset, which also gives the plan's measured latency); ``--table DIR`` adds the latency
table's price of every layer (un-profiled, in-context share), so the per-node columns can be
set against what the table says.

The profiler inflates small runs, so compare the two columns with each other, not with
un-profiled timings (and repeat: on a shared VM the whole-model column moves between runs).
Convolution nodes are paired with the model's conv layers by the module path in the exported
node names; a conv fused with the activation after it is named after that activation by the
runtime and is paired with the conv it follows in the same block (``f.a.0`` with ``f.a.2``).
"""

from __future__ import annotations

import argparse
import collections

import numpy as np


def module_path(node_name: str) -> str:
    """The dotted module path of an exported node (``/layer2/layer2.0/downsample/downsample.0/
    Conv`` -> ``layer2.0.downsample.0``, ``/features/features.1/features.1.0/block/block.0/
    block.0.0/Conv`` -> ``features.1.0.block.0.0``): scope segments, where an indexed child's
    segment is its parent's segment plus ``.<index>``."""
    parts: list[str] = []
    prev = ""
    for seg in [s for s in node_name.split("/")[:-1] if s]:
        if parts and prev and seg.startswith(prev + "."):
            parts[-1] += seg[len(prev):]
        else:
            parts.append(seg)
        prev = seg
    return ".".join(parts)


def node_ms(onnx_model: bytes, runs: int) -> dict[str, tuple[str, float]]:
    """Per node of a profiled session: (op type, median kernel time in ms), by node name."""
    from autoprune import bundle_runner as br

    per: dict[str, list[float]] = collections.defaultdict(list)
    ops: dict[str, str] = {}
    for e in br.profiled_events(onnx_model, runs=runs):
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            name = e["name"][: -len("_kernel_time")]
            per[name].append(float(e["dur"]))
            ops[name] = str((e.get("args") or {}).get("op_name", "?"))
    return {k: (ops[k], float(np.median(v[-runs:])) / 1000) for k, v in per.items()}


def pair_convs(conv_names: list[str], whole: dict[str, float]) -> dict[str, float]:
    """Whole-model ms per conv layer: a node named after the layer, else (a conv fused with the
    activation after it) the node named after the next sibling module in the same block that is
    not itself a conv layer (``f.a.2`` for ``f.a.0``)."""
    out: dict[str, float] = {}
    convs = set(conv_names)
    # the indexed non-conv nodes of each block: parent path -> [(index, node path)]
    siblings: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
    for k in whole:
        parent, _, idx = k.rpartition(".")
        if idx.isdigit() and k not in convs:
            siblings[parent].append((int(idx), k))
    for name in conv_names:
        if name in whole:
            out[name] = whole[name]
            continue
        parent, _, idx = name.rpartition(".")
        later = [s for s in siblings.get(parent, []) if idx.isdigit() and s[0] > int(idx)]
        if later:
            out[name] = whole[min(later)[1]]
    return out


def by_op(nodes: dict[str, tuple[str, float]]) -> collections.Counter[str]:
    out: collections.Counter[str] = collections.Counter()
    for op, ms in nodes.values():
        out[op] += ms
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", help="a torchvision model name")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--keep", type=float, default=1.0,
                   help="a uniform plan at this keep ratio (1.0: the dense model)")
    p.add_argument("--alignment", type=int, default=1,
                   help="the uniform plan's width step (1: widths not snapped)")
    p.add_argument("--plan", default=None, metavar="CSV:ROW",
                   help="a measured plan from a bench_predictor dataset CSV (overrides --keep)")
    p.add_argument("--table", default=None, help="a latency-table directory to price layers with")
    args = p.parse_args()
    import pandas as pd
    import torch

    from autoprune import zoo
    from autoprune._analyze import analyze
    from autoprune.backends.micro import build_micro_model
    from autoprune.executor import apply_plan
    from autoprune.onnx_export import to_onnx
    from autoprune.plan import PruningPlan
    from autoprune.types import OpKind, Structure

    torch.manual_seed(0)
    model = zoo.torchvision_model(args.model, num_classes=10).eval()
    x = torch.randn(1, 3, args.size, args.size)
    spec = analyze(model, (x,))
    label = f"keep {args.keep} (step {args.alignment})"
    plan = None
    if args.plan:
        csv, _, row = args.plan.rpartition(":")
        r = pd.read_csv(csv).iloc[int(row)]
        plan = PruningPlan.from_json(r["plan_json"])
        label = (f"plan {args.plan} ({r['kind']}, measured {r['latency_ms']:.3f} ms, "
                 f"table sum {r['table_ms']:.3f} ms)")
    elif args.keep < 1.0:
        plan = PruningPlan.uniform(spec, args.keep, alignment=args.alignment)
    if plan is not None:
        model = apply_plan(model, plan, (x,), spec=spec).eval()
        spec = analyze(model, (x,))
    table = None
    if args.table:
        from autoprune.latency import LatencyTable

        table = LatencyTable.load(args.table)
    convs = [(n, lay) for n, lay in spec.layers.items()
             if lay.spec.op in (OpKind.CONV2D, OpKind.DWCONV2D)]
    whole_nodes = node_ms(to_onnx(model, (x,)), args.runs)
    whole = pair_convs([n for n, _ in convs],
                       {module_path(k): ms for k, (op, ms) in whole_nodes.items()})
    micro_nodes = {}  # every layer's micro-model, all its nodes, profiled once
    for name, lay in spec.layers.items():
        micro, inputs = build_micro_model(lay.spec, Structure.NONE, 1.0)
        micro_nodes[name] = node_ms(to_onnx(micro, inputs), args.runs)
    micro_ops: collections.Counter[str] = collections.Counter()
    for nodes in micro_nodes.values():
        micro_ops.update(by_op(nodes))
    whole_ops = by_op(whole_nodes)
    print(f"{args.model} at {args.size}², {label}, profiled, ms per run by op type\n")
    print("| op | whole model | sum of its layers' micro-models |")
    print("|---|---|---|")
    for op in sorted(set(whole_ops) | set(micro_ops), key=lambda o: -micro_ops[o]):
        print(f"| {op} | {whole_ops[op]:.3f} | {micro_ops[op]:.3f} |")
    print(f"| all nodes | {sum(whole_ops.values()):.3f} | {sum(micro_ops.values()):.3f} |\n")
    print("ms per convolution node\n")
    print("| layer | in → out (groups) | weights (MB) | alone | in the whole model | difference |"
          + (" table (un-profiled) |" if table else ""))
    print("|---|---|---|---|---|---|" + ("---|" if table else ""))
    tot_alone = tot_whole = tot_table = 0.0
    for name, lay in convs:
        if name not in whole:
            continue
        alone = sum(ms for op, ms in micro_nodes[name].values() if "Conv" in op)
        w = whole[name]
        tot_alone += alone
        tot_whole += w
        sp = lay.spec
        cell = ""
        if table is not None:
            t = table.lookup(sp, policy="interpolate")
            tot_table += t
            cell = f" {t:.3f} |"
        print(f"| {name} | {sp.in_channels} → {sp.out_channels} ({sp.groups}) | "
              f"{sp.params * 4 / 1e6:.2f} | {alone:.3f} | {w:.3f} | {w - alone:+.3f} |{cell}")
    print(f"| all paired | | | {tot_alone:.3f} | {tot_whole:.3f} | {tot_whole - tot_alone:+.3f} |"
          + (f" {tot_table:.3f} |" if table else ""))


if __name__ == "__main__":
    main()
