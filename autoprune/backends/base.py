"""The ``Backend`` interface: a device + runtime that can time layers and whole models.

A backend implements two primitives — ``device_info()`` and ``_timer_for_model(model,
example_inputs)`` (a zero-argument callable that runs the prepared model once and returns its
time in ms) — and inherits every measurement from them, all through the one protocol in
``autoprune.measure``:

* ``measure_layer(spec, structure, density)`` builds the single-layer micro-model *with its
  fused ops* (``autoprune.backends.micro``), prepares it the way the runtime runs it and times it;
* ``measure_layers(items)`` does the same for many entries, interleaved (used by the profiler);
* ``measure_model(model, example_inputs)``; ``measure_interleaved(models, example_inputs)``
  (round-robin so that drift hits all models alike);
* ``measure_ratio(model, reference, example_inputs)`` → (median ratio, IQR of ratios), paired
  alternating timing (DESIGN.md §5).

Masked models (``weight_mask`` buffers) are baked before they are prepared.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from torch import nn

from autoprune.errors import BackendUnavailable, InvalidInputError
from autoprune.measure import (
    ProtocolSettings,
    TimedCall,
    measure_interleaved,
    measure_ratio,
)
from autoprune.types import DeviceInfo, LatencySample, LayerSpec, Structure

#: one profiler work item: (layer shape, structure, density)
LayerItem = tuple[LayerSpec, Structure, float]


def as_structure(structure: Structure | str) -> Structure:
    """``structure`` as a ``Structure``; an unknown name is an ``InvalidInputError``."""
    try:
        return Structure(structure)
    except ValueError:
        raise InvalidInputError(
            f"unknown structure {structure!r}; use one of {[s.value for s in Structure]}"
        ) from None


def check_layer_items(items: Sequence[LayerItem]) -> list[LayerItem]:
    """Profiler work items with their structure normalised (``channel`` → ``none``, ``block``
    refused) and their density checked (a finite number in (0, 1])."""
    from autoprune.latency._table import normalize_structure

    out: list[LayerItem] = []
    for spec, structure, density in items:
        d = float(density)
        if not 0.0 < d <= 1.0:  # also refuses NaN
            raise InvalidInputError(
                f"density={density!r} for {structure} layer {spec}; use a fraction of kept "
                "weights in (0, 1] (1.0 for dense)"
            )
        out.append((spec, normalize_structure(structure), d))
    return out


class Backend(ABC):
    """A device + runtime. Construct through ``autoprune.get_backend(name, **options)``.

    ``protocol`` (a ``ProtocolSettings``) sets warm-up, run counts, target spread and time cap.
    """

    #: registry name, e.g. "onnxruntime-cpu"
    name: ClassVar[str] = ""
    #: what to install when ``is_available()`` is False
    requirement: ClassVar[str] = ""

    def __init__(self, protocol: ProtocolSettings | None = None) -> None:
        self.protocol = protocol or ProtocolSettings()
        self._device_info: DeviceInfo | None = None

    # --- identity ------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def is_available(cls) -> bool:
        """Whether the runtime (and hardware) this backend needs is present."""

    @classmethod
    def unavailable_reason(cls) -> str:
        return f"backend {cls.name!r} is not available here: {cls.requirement}"

    def _require(self) -> None:
        if not self.is_available():
            raise BackendUnavailable(self.unavailable_reason())

    def device_info(self) -> DeviceInfo:
        """Fingerprint of the device and runtime (cached per backend instance)."""
        if self._device_info is None:
            self._device_info = self._make_device_info()
        return self._device_info

    @abstractmethod
    def _make_device_info(self) -> DeviceInfo: ...

    def accelerates(self, structure: Structure | str, spec: LayerSpec | None = None) -> bool:
        """Whether ``structure`` can run faster than dense here (only ``none`` on CPUs).

        With ``spec`` given, whether it can for that layer (e.g. 2:4 only for linear layers
        in ``torch-cuda``).
        """
        return as_structure(structure) in (Structure.NONE, Structure.CHANNEL)

    # --- primitives ----------------------------------------------------------------------
    @abstractmethod
    def _timer_for_model(self, model: nn.Module, example_inputs: Any) -> TimedCall:
        """Prepare ``model`` (eval, baked) for this runtime; a timed call running it once."""

    def _timer_for_layer(self, spec: LayerSpec, structure: Structure, density: float) -> TimedCall:
        from autoprune.backends.micro import build_micro_model

        model, inputs = build_micro_model(spec, structure, density)
        return self._timer_for_model(model, inputs)

    # --- measurements --------------------------------------------------------------------
    def measure_layer(
        self, spec: LayerSpec, structure: Structure | str = Structure.NONE, density: float = 1.0
    ) -> LatencySample:
        """Time one layer (with its fused ops) as a single-layer micro-model."""
        return self.measure_layers([(spec, as_structure(structure), density)])[0]

    def measure_layers(self, items: Sequence[LayerItem]) -> list[LatencySample]:
        """Time several table entries, interleaved round-robin; one sample per item."""
        self._require()
        timers = [self._timer_for_layer(s, st, d) for s, st, d in check_layer_items(items)]
        return measure_interleaved(timers, self.protocol)

    def measure_model(self, model: nn.Module, example_inputs: Any) -> LatencySample:
        """Time the whole model (un-profiled)."""
        return self.measure_interleaved([model], example_inputs)[0]

    def measure_interleaved(
        self, models: Sequence[nn.Module], example_inputs: Any
    ) -> list[LatencySample]:
        """Time several models round-robin on the same inputs, in lockstep (none stops before
        the others: they are compared with each other); one sample per model."""
        self._require()
        if not models:
            raise InvalidInputError("measure_interleaved needs at least one model")
        timers = [self._timer_for_model(m, example_inputs) for m in models]
        return measure_interleaved(timers, self.protocol, lockstep=True)

    def measure_ratio(
        self, model: nn.Module, reference: nn.Module, example_inputs: Any
    ) -> tuple[float, float]:
        """Paired alternating timing of ``model`` against ``reference``:
        (median of per-pair latency ratios model/reference, IQR of those ratios)."""
        self._require()
        a = self._timer_for_model(model, example_inputs)
        b = self._timer_for_model(reference, example_inputs)
        return measure_ratio(a, b, self.protocol)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options_repr()})"

    def options_repr(self) -> str:
        return ""
