"""Device backends behind one interface, looked up by name.

``get_backend(name, **options) -> Backend``:

==================  ===========================================================================
name                options
==================  ===========================================================================
onnxruntime-cpu     ``threads=1``, ``graph_optimization_level="all"``, ``providers=None``
                    (→ ["CPUExecutionProvider"]; XNNPACK where the build has it)
torch-cuda          ``dtype="fp16"|"bf16"|"fp32"``, ``cuda_graphs=False``, ``device_index=0``
tensorrt            ``fp16=True``, ``int8=False``, ``sparse_weights=False``, ``workspace_mb``
synthetic           ``cost_fn=None`` or ``alignment=16``, ``noise=0.0``, ``seed=0``, ... (tests)
==================  ===========================================================================

Every backend also takes ``protocol=ProtocolSettings(...)`` (``autoprune.measure``).
An unknown name raises ``UnknownNameError`` listing the known ones; a backend whose runtime or
hardware is missing raises ``BackendUnavailable`` saying what to install.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from autoprune.errors import BackendUnavailable, UnknownNameError

if TYPE_CHECKING:
    from autoprune.backends.base import Backend

# name -> (module, class); imported on first use so that torch-cuda/tensorrt cost nothing here
_REGISTRY: dict[str, tuple[str, str]] = {
    "onnxruntime-cpu": ("autoprune.backends.onnxruntime_cpu", "OnnxRuntimeCPUBackend"),
    "torch-cuda": ("autoprune.backends.torch_cuda", "TorchCUDABackend"),
    "tensorrt": ("autoprune.backends.tensorrt", "TensorRTBackend"),
    "synthetic": ("autoprune.backends.synthetic", "SyntheticBackend"),
}


def backend_class(name: str) -> type[Backend]:
    """The class registered under ``name`` (``UnknownNameError`` if there is none)."""
    if name not in _REGISTRY:
        raise UnknownNameError("backend", name, list(_REGISTRY))
    module, cls = _REGISTRY[name]
    found: type[Backend] = getattr(importlib.import_module(module), cls)
    return found


def get_backend(name: str, **options: Any) -> Backend:
    """Construct the backend ``name`` with ``options`` (see the module docstring).

    Raises ``UnknownNameError`` for an unknown name and ``BackendUnavailable`` (naming what to
    install) when its runtime or hardware is missing.
    """
    cls = backend_class(name)
    if not cls.is_available():
        raise BackendUnavailable(cls.unavailable_reason())
    return cls(**options)


def list_backends(available_only: bool = False) -> list[str]:
    """Registered backend names (only those usable here with ``available_only``)."""
    names = sorted(_REGISTRY)
    if available_only:
        names = [n for n in names if backend_class(n).is_available()]
    return names


def __getattr__(name: str) -> Any:
    if name == "Backend":
        from autoprune.backends.base import Backend

        return Backend
    raise AttributeError(f"module 'autoprune.backends' has no attribute {name!r}")


__all__ = ["backend_class", "get_backend", "list_backends", "Backend"]
