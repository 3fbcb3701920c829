"""``analyze(model, example_inputs) -> ModelSpec`` and what the executor shares with it.

Private modules:

- ``_core``: ``analyze`` itself (channel groups -> layers -> allowed structures -> blocks);
- ``_trace``: the one real forward pass (layer input shapes, fused ops, identity residuals);
- ``_adapters``: the layer-adapter registry (``ADAPTERS``): everything autoprune knows about a
  module type (conv, linear, attention, norms, refused types) lives in one class;
- ``_tpglue``: the torch-pruning glue (dependency graphs, channel removal, the dry-run check)
  that both ``analyze`` and the executor (``autoprune.executor``) use.
"""

from __future__ import annotations

from autoprune._analyze._core import NM_MULTIPLE, analyze
from autoprune._analyze._tpglue import (
    Graphs,
    build_graphs,
    custom_param_modules,
    functional_weight_modules,
    normalize_inputs,
)

__all__ = [
    "NM_MULTIPLE",
    "Graphs",
    "analyze",
    "build_graphs",
    "custom_param_modules",
    "functional_weight_modules",
    "normalize_inputs",
]
