"""The measured-plan dataset: one CSV row per plan measured on the device, plus a JSON sidecar.

Columns (``BASE_COLUMNS``): the plan's JSON, its kind (``autoprune.latency._sampler``), the
median / IQR / run count / minimum of its latency, the same for the dense model timed in the
same chunk (``ref_*``), the chunk number, seconds spent, and the train/holdout split; a fitted
dataset also carries the features. Written atomically after every chunk, so a killed fit
resumes; the sidecar holds the schema version, the model fingerprint and the predictor's
parameters, so ``LatencyPredictor.load`` refits exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from autoprune.errors import CorruptFileError
from autoprune.io import atomic_write_json, atomic_write_text, read_json
from autoprune.plan import PruningPlan

if TYPE_CHECKING:
    import pandas as pd

DATASET_SCHEMA_VERSION = 2
#: version 1 (before plan kinds) is read too: its plans get the kind "unknown"
READABLE_VERSIONS = (1, 2)
BASE_COLUMNS = ("plan_json", "kind", "measured_ms", "iqr_ms", "n_runs", "min_ms", "ref_ms",
                "ref_iqr_ms", "ref_min_ms", "chunk", "measure_seconds", "prepare_seconds",
                "split")


def plan_key(plan: PruningPlan) -> str:
    return plan.to_json(indent=None)


def next_chunk(rows: pd.DataFrame) -> int:
    if not len(rows) or "chunk" not in rows.columns or rows["chunk"].isna().all():
        return 0
    return int(rows["chunk"].max()) + 1


def meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def read_meta(path: Path) -> dict[str, Any]:
    meta = read_json(meta_path(path))
    if not isinstance(meta, dict):
        raise CorruptFileError(f"{meta_path(path)}: expected a JSON object")
    return meta


def read_dataset(path: str | Path) -> pd.DataFrame:
    import pandas as pd

    path = Path(path)
    try:
        # exact float round trip (pandas >= 3 does it by default and deprecates the option)
        extra = {} if int(pd.__version__.split(".")[0]) >= 3 else {
            "float_precision": "round_trip"}
        rows = pd.read_csv(path, **extra)
    except FileNotFoundError:
        raise CorruptFileError(f"{path}: file not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path}: not a predictor dataset CSV ({e})") from None
    if "kind" not in rows.columns and "plan_json" in rows.columns:
        rows.insert(1, "kind", "unknown")
    return rows


def check_dataset(rows: pd.DataFrame) -> None:
    missing = [c for c in ("plan_json", "measured_ms") if c not in rows.columns]
    if missing:
        raise CorruptFileError(
            f"predictor dataset lacks columns {missing}; it needs plan_json and "
            "measured_ms (ref_ms optional)"
        )
    bad = rows["measured_ms"].isna() | (rows["measured_ms"] <= 0)
    if bad.any():
        raise CorruptFileError(
            f"predictor dataset has {int(bad.sum())} rows with a missing or non-positive "
            f"measured_ms (first at row {int(np.flatnonzero(bad.to_numpy())[0])})"
        )


def base_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Only the measured columns (features and fitted columns dropped)."""
    return rows[[c for c in rows.columns if c in BASE_COLUMNS]]


def write_dataset(path: Path, rows: pd.DataFrame, meta: dict[str, Any]) -> None:
    """CSV then sidecar, each atomically."""
    atomic_write_text(path, rows.to_csv(index=False, float_format=None))
    atomic_write_json(meta_path(path), {"schema_version": DATASET_SCHEMA_VERSION, **meta})


__all__ = ["BASE_COLUMNS", "DATASET_SCHEMA_VERSION", "check_dataset", "read_dataset",
           "read_meta", "write_dataset"]
