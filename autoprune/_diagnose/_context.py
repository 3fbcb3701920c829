"""What ``diagnose`` and ``repair`` share: the backend, the reference's spec and latency table,
the device's kernel rules, and the pruned model read against the reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autoprune._analyze import analyze, normalize_inputs
from autoprune._analyze._plain import copy_module, without_torch_pruning
from autoprune._diagnose._match import (
    LayerWidths,
    check_structure,
    plan_from_widths,
    read_widths,
)
from autoprune.errors import InvalidInputError, TableMismatchError
from autoprune.latency._rules import KernelRules, cached_kernel_rules
from autoprune.latency._table import LatencyTable
from autoprune.plan import PruningPlan
from autoprune.types import LayerSpec, ModelSpec, Structure

#: a layer whose effective weights are at least this share exactly zero counts as masked
MASKED_ZERO_SHARE = 0.05


@dataclass
class Context:
    backend: Any
    device: str
    inputs: tuple[torch.Tensor, ...]
    spec: ModelSpec
    widths: dict[str, LayerWidths]
    plan: PruningPlan
    kept: dict[str, int]
    table: LatencyTable
    rules: KernelRules
    #: the pruned model as the device runs it (``torch.nn.utils.prune`` made permanent on a
    #: copy; the input itself otherwise)
    runnable: nn.Module

    def price(self, spec: LayerSpec, structure: Structure = Structure.NONE,
              density: float = 1.0) -> float:
        """Table latency (ms) of one layer, any width, by the device's kernel rules."""
        return float(self.table.lookup(spec, structure, density, policy="interpolate"))

    def predict(self, plan: PruningPlan) -> float:
        """Sum of table latencies of every layer under ``plan`` (ms)."""
        return sum(self.price(p.spec, p.structure, p.density)
                   for p in self.spec.pruned_layers(plan))

    @property
    def masked_layers(self) -> list[str]:
        return [n for n, w in self.widths.items()
                if w.masked or w.weight_zero_share >= MASKED_ZERO_SHARE]

    def structures_that_help(self) -> list[str]:
        """Structures that run faster than dense on this device (channel removal, and 2:4
        where the backend has sparse kernels)."""
        return [s.value for s in (Structure.CHANNEL, Structure.NM, Structure.UNSTRUCTURED,
                                  Structure.BLOCK) if self.backend.accelerates(s)]


def resolve_backend(device: Any) -> tuple[Any, str]:
    if isinstance(device, str):
        from autoprune.backends import get_backend

        backend = get_backend(device)
    else:
        backend = device
    for attr in ("device_info", "measure_ratio", "measure_interleaved", "accelerates"):
        if not callable(getattr(backend, attr, None)):
            raise InvalidInputError(
                f"device must be a backend name (see autoprune.list_backends()) or a Backend, "
                f"got {type(device).__name__} without {attr}()")
    return backend, getattr(backend, "name", "") or type(backend).__name__


def build_context(pruned: nn.Module, reference: nn.Module, example_inputs: Any, device: Any,
                  table: LatencyTable | None) -> Context:
    check_structure(pruned, reference)
    # a copy: a torch.nn.utils.prune model's masked weights are non-leaf after a forward pass
    # (not deep-copyable), and the user's model is not touched
    pruned = copy_module(pruned)
    backend, name = resolve_backend(device)
    inputs = normalize_inputs(example_inputs)
    spec = analyze(reference, inputs)
    widths = read_widths(pruned, spec)
    plan, kept = plan_from_widths(spec, widths)
    if table is None:
        from autoprune.latency._profile import profile

        table = profile(reference, inputs, backend, spec=spec, progress=False)
    elif not isinstance(table, LatencyTable):
        raise InvalidInputError(f"table must be a LatencyTable, got {type(table).__name__}")
    elif table.device_id != backend.device_info().device_id:
        raise TableMismatchError(
            f"table is for {table.device_id} but the backend is "
            f"{backend.device_info().device_id}; profile the reference on this device "
            "(autoprune.profile) or pass table=None")
    rules = table.kernel_rules if table.kernel_rules is not None else cached_kernel_rules(backend)
    return Context(backend, name, inputs, spec, widths, plan, kept, table, rules,
                   without_torch_pruning(pruned))
