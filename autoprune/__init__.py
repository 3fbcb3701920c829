"""autoprune: prune a PyTorch model to a latency budget measured on the target device.

The public API is the names in ``__all__``; each lives in its own module and is imported on
first use, so ``import autoprune`` is cheap and does no work.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # data types
    "Structure": "autoprune.types",
    "OpKind": "autoprune.types",
    "LayerSpec": "autoprune.types",
    "Layer": "autoprune.types",
    "PrunableGroup": "autoprune.types",
    "ModelSpec": "autoprune.types",
    "DeviceInfo": "autoprune.types",
    "LatencySample": "autoprune.types",
    "PruningPlan": "autoprune.plan",
    "GroupPlan": "autoprune.plan",
    # stages
    "analyze": "autoprune._analyze",
    "apply_plan": "autoprune.executor",
    "get_backend": "autoprune.backends",
    "list_backends": "autoprune.backends",
    "profile": "autoprune.latency",
    "LatencyTable": "autoprune.latency",
    "LatencyPredictor": "autoprune.latency",
    "SearchSpace": "autoprune.space",
    "search": "autoprune._search",
    "SearchResult": "autoprune._search",
    "accuracy_evaluator": "autoprune.evaluators",
    "agreement_evaluator": "autoprune.evaluators",
    "finetune": "autoprune._finetune",
    "run_pipeline": "autoprune.pipeline",
    "SearchConfig": "autoprune.pipeline",
    "FinetuneOptions": "autoprune.pipeline",
    "optimize": "autoprune._search",
    "select_finalists": "autoprune._search",
    "verify": "autoprune.export",
    "export_onnx": "autoprune.export",
    "export_tensorrt": "autoprune.export",
    "PipelineReport": "autoprune.pipeline",
    "FinetuneResult": "autoprune._finetune",
    "GradualSchedule": "autoprune._finetune",
    "PruningCallback": "autoprune._finetune",
    "GradualPruning": "autoprune._finetune",
    "MaskEnforcer": "autoprune._finetune",
    "EarlyStopping": "autoprune._finetune",
    "Rewind": "autoprune._finetune",
    "Checkpoint": "autoprune._finetune",
    "Trainer": "autoprune._finetune",
    "TrainState": "autoprune._finetune",
    "FinetuneConfig": "autoprune._finetune",
    "evaluate_accuracy": "autoprune._finetune",
    "distillation_loss": "autoprune._finetune",
    "make_storage": "autoprune.storage",
    "diagnose": "autoprune._diagnose",
    "repair": "autoprune._diagnose",
    "DiagnosisReport": "autoprune._diagnose",
    "RepairResult": "autoprune._diagnose",
    "errors": "autoprune.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'autoprune' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if name == "errors" else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
