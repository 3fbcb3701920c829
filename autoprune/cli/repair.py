"""``autoprune repair``: round a pruned model's widths to the device's fast widths, from its
own weights, measured against it on the device (never slower than the input).

    autoprune repair --reference torchvision.models:resnet18 --model-kwargs '{"num_classes": 10}' \\
        --pruned pruned_state_dict.pt --input-shape 1,3,32,32 --device onnxruntime-cpu \\
        --output repaired.pt [--latency-budget-ms 1.5] [--plan-out plan.json]

``--output`` gets the repaired model's state_dict; ``--plan-out`` its plan (``apply_plan`` of
the plan on the reference gives a model of the same shapes to load it into).
"""

from __future__ import annotations

import argparse
from typing import Any

from autoprune.cli.diagnose import add_model_args


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "repair", help="the nearest fast-width version of a pruned model, measured",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--output", required=True, help="state_dict of the repaired model")
    p.add_argument("--latency-budget-ms", type=float, default=None)
    p.add_argument("--plan-out", default=None, help="write the repaired plan (JSON) here")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from autoprune._diagnose import repair
    from autoprune.cli.common import make_backend
    from autoprune.cli.diagnose import load_models
    from autoprune.io import atomic_torch_save

    reference, pruned, x = load_models(args)
    result = repair(pruned, reference, x, device=make_backend(args),
                    latency_budget_ms=args.latency_budget_ms)
    print(result)
    print(f"wrote {atomic_torch_save(result.model.state_dict(), args.output)}")
    if args.plan_out:
        print(f"wrote {result.plan.save(args.plan_out)}")
    return 0
