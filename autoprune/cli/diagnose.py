"""``autoprune diagnose``: where a pruned model's time goes on a device, layer by layer.

    autoprune diagnose --reference torchvision.models:resnet18 --model-kwargs '{"num_classes": 10}' \\
        --pruned pruned_state_dict.pt --input-shape 1,3,32,32 --device onnxruntime-cpu \\
        [--weights dense.pt] [--csv layers.csv] [--plot layers.png] [--plan-out plan.json]

``--pruned`` is the state_dict of a channel-pruned copy of the reference (Torch-Pruning's
``model.state_dict()``, ``torch.nn.utils.prune`` masks included), loaded with
``torch.load(weights_only=True)``; the pruned model is rebuilt from the reference at its shapes.
"""

from __future__ import annotations

import argparse
from typing import Any

from autoprune.cli.common import add_backend_args


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reference", required=True,
                   help="the dense model's factory, module:callable")
    p.add_argument("--model-kwargs", default=None, help="JSON keyword arguments of the factory")
    p.add_argument("--weights", default=None,
                   help="the dense model's state_dict: the weights the pruned model was made "
                        "from (without them repair cannot match the pruned model's channels "
                        "and rebuilds from the reference)")
    p.add_argument("--pruned", required=True, help="the pruned model's state_dict file")
    p.add_argument("--input-shape", required=True, help="e.g. 1,3,32,32")
    add_backend_args(p)


def load_models(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(reference, pruned, example input) from the shared arguments."""
    import torch

    from autoprune._diagnose._match import pruned_from_state_dict
    from autoprune.cli.common import load_model, parse_shape
    from autoprune.errors import InvalidInputError
    from autoprune.io import safe_torch_load

    x = torch.randn(parse_shape(args.input_shape))
    reference = load_model(args.reference, args.model_kwargs, args.weights)
    state = safe_torch_load(args.pruned)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InvalidInputError(f"--pruned {args.pruned}: expected a state_dict (name -> tensor)")
    return reference, pruned_from_state_dict(reference, state, (x,)), x


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "diagnose", help="per-layer latency of a pruned model against its reference",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--csv", default=None, help="write the per-layer table as CSV here")
    p.add_argument("--plot", default=None, help="write a per-layer bar chart PNG here")
    p.add_argument("--plan-out", default=None, help="write the plan of the pruned widths here")
    p.add_argument("--no-measure", action="store_true", help="skip the whole-model timing")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from autoprune._diagnose import diagnose
    from autoprune.cli.common import make_backend
    from autoprune.io import atomic_write_text

    reference, pruned, x = load_models(args)
    report = diagnose(pruned, reference, x, device=make_backend(args),
                      measure=not args.no_measure)
    print(report)
    if args.csv:
        print(f"wrote {atomic_write_text(args.csv, report.layers.to_csv(index=False))}")
    if args.plot:
        print(f"wrote {report.plot(args.plot)}")
    if args.plan_out:
        print(f"wrote {report.plan.save(args.plan_out)}")
    return 0
