"""The measurement campaign: time pruned variants of a model on the device, paired with dense.

Plans are applied (``autoprune.executor.apply_plan``) and timed in chunks; with ``paired``
each chunk is timed interleaved with the dense model, so the fit can use
``measured / dense-in-same-chunk × median dense`` and a drifting machine cancels out
(DESIGN.md §5). After every chunk a callback gets the rows so far (the predictor checkpoints
them), so a killed campaign loses at most one chunk.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from autoprune.latency._dataset import plan_key
from autoprune.plan import PruningPlan
from autoprune.types import ModelSpec

if TYPE_CHECKING:
    import pandas as pd


def estimate_seconds(n_plans: int, chunk_size: int, backend: Any,
                     prepare_s_per_plan: float = 1.0) -> float:
    """A rough estimate of a campaign's wall time: every timed configuration (the plans and
    one dense reference per chunk) runs until about the protocol's time cap, and each plan is
    applied, exported and warmed up once (``prepare_s_per_plan``: about 1 s for torchvision
    models at 224² on one thread; measured 110 s for resnet18's 48 plans, estimated 102 s)."""
    protocol = getattr(backend, "protocol", None)
    cap = float(getattr(protocol, "time_cap_s", 1.0) or 1.0)
    configs = n_plans + math.ceil(n_plans / max(1, chunk_size))
    return configs * cap + n_plans * prepare_s_per_plan


def measure_plans(
    plans: Sequence[PruningPlan],
    kinds: Sequence[str],
    model: Any,
    example_inputs: Any,
    backend: Any,
    spec: ModelSpec,
    *,
    chunk_size: int = 8,
    paired: bool = True,
    first_chunk: int = 0,
    split: str | None = None,
    on_chunk: Callable[[pd.DataFrame], None] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Measure ``plans`` (one row each, ``autoprune.latency._dataset.BASE_COLUMNS``)."""
    import pandas as pd
    from tqdm.auto import tqdm

    from autoprune.executor import apply_plan

    records: list[dict[str, Any]] = []
    chunk = max(1, int(chunk_size))
    bar = tqdm(total=len(plans), desc=f"measuring {spec.model_name} plans",
               disable=not progress, unit="plan")
    for start in range(0, len(plans), chunk):
        part = plans[start:start + chunk]
        part_kinds = kinds[start:start + chunk]
        t = time.perf_counter()
        # which channels are kept does not change the latency, only how many: the cheap seeded
        # random criterion skips the magnitude scoring (a third of apply_plan's time on
        # resnet18) and never needs gradients
        pruned = [apply_plan(model, p, example_inputs, spec=spec, importance="random")
                  for p in part]
        prepare = (time.perf_counter() - t) / max(1, len(part))
        t = time.perf_counter()
        if paired:
            samples = list(backend.measure_interleaved([model, *pruned], example_inputs))
            ref, samples = samples[0], samples[1:]
        else:
            ref = None
            samples = list(backend.measure_interleaved(pruned, example_inputs))
        seconds = (time.perf_counter() - t) / max(1, len(part))
        nan = float("nan")
        for p, kind, s in zip(part, part_kinds, samples):
            records.append({
                "plan_json": plan_key(p),
                "kind": kind,
                "measured_ms": float(s.median_ms),
                "iqr_ms": float(s.iqr_ms),
                "n_runs": int(s.n_runs),
                "min_ms": float(s.min_ms),
                "ref_ms": float(ref.median_ms) if ref is not None else nan,
                "ref_iqr_ms": float(ref.iqr_ms) if ref is not None else nan,
                "ref_min_ms": float(ref.min_ms) if ref is not None else nan,
                "chunk": first_chunk + start // chunk,
                "measure_seconds": seconds,
                "prepare_seconds": prepare,
                **({"split": split} if split is not None else {}),
            })
        if on_chunk is not None:
            on_chunk(pd.DataFrame.from_records(records))
        bar.update(len(part))
    bar.close()
    return pd.DataFrame.from_records(records)


__all__ = ["estimate_seconds", "measure_plans"]
