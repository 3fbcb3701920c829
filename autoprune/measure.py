"""The timing protocol every backend uses (DESIGN.md §5, "Measuring latency honestly").

* warm-up runs first (not recorded);
* then timed runs, adaptive: after ``min_runs`` a configuration stops as soon as its relative
  interquartile range is at most ``target_rel_iqr``; every configuration stops at
  ``max_runs`` or when ``time_cap_s`` (per configuration) is spent, never before ``min_runs``;
* several configurations are timed round-robin (``measure_interleaved``) so that drift of a
  shared machine hits all of them alike; whole models compared with each other are timed in
  lockstep (none stops before the others);
* paired ratios (``measure_ratio``): a candidate and a reference alternate, and the median of
  the per-pair ratios is far steadier than two absolute medians taken apart;
* no configuration is timed cold: each sample is a burst (run untimed for ``settle_ms``, then
  ``burst_runs`` timed runs), because a small model timed right after a large one ran up to
  2.4x slower than in steady state on our CPUs (BENCHMARKS.md, "Paired timing");
* very short calls are repeated ``calls_per_sample`` times per timed sample so that one sample
  lasts at least ``min_sample_ms`` (timer resolution and call overhead stay small).

The loop itself lives in ``autoprune.bundle_runner`` (standard library only) so that the
standalone bundle runner on a remote device runs the same code.
A "timed call" is a zero-argument callable that runs the configuration once and returns its
duration in milliseconds (wall clock on CPU, CUDA events on GPU).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from autoprune import bundle_runner as _core
from autoprune.errors import InvalidInputError
from autoprune.types import LatencySample

TimedCall = Callable[[], float]


@dataclass(frozen=True)
class ProtocolSettings:
    """Settings of the timing protocol; recorded in every latency table's sidecar."""

    warmup_runs: int = 10
    min_runs: int = 20
    max_runs: int = 300
    target_rel_iqr: float = 0.05
    time_cap_s: float = 1.0
    min_sample_ms: float = 0.05
    settle_ms: float = 3.0
    burst_runs: int = 5
    #: also stop a configuration once its median's relative standard error is at most this
    #: (``autoprune.bundle_runner.median_rel_se``; 0: off). 1% stops a layer with a 10% IQR
    #: after about 90 runs instead of ``max_runs``
    target_rel_se: float = 0.01

    def __post_init__(self) -> None:
        if self.min_runs < 1 or self.max_runs < self.min_runs:
            raise InvalidInputError(
                f"need 1 <= min_runs <= max_runs, got min_runs={self.min_runs}, "
                f"max_runs={self.max_runs}"
            )
        if self.burst_runs < 1 or self.settle_ms < 0:
            raise InvalidInputError(
                f"burst_runs={self.burst_runs} must be >= 1 and settle_ms={self.settle_ms} >= 0"
            )
        if self.warmup_runs < 0 or self.time_cap_s <= 0 or self.target_rel_iqr < 0 \
                or self.target_rel_se < 0:
            raise InvalidInputError(
                f"warmup_runs={self.warmup_runs}, time_cap_s={self.time_cap_s}, "
                f"target_rel_iqr={self.target_rel_iqr}, target_rel_se={self.target_rel_se}: "
                "all must be >= 0 (time cap > 0)"
            )

    @classmethod
    def quick(cls) -> ProtocolSettings:
        """A fast protocol for tests and smoke runs (numbers are noisier)."""
        return cls(warmup_runs=2, min_runs=5, max_runs=20, target_rel_iqr=0.2, time_cap_s=0.1,
                   min_sample_ms=0.0, settle_ms=0.0, burst_runs=1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProtocolSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def to_sample(times_ms: Sequence[float]) -> LatencySample:
    """Median, IQR, count and minimum of a list of times (ms)."""
    med, iqr, n, mn = _core.summarize(times_ms)
    return LatencySample(median_ms=med, iqr_ms=iqr, n_runs=n, min_ms=mn)


def _kwargs(settings: ProtocolSettings) -> dict[str, Any]:
    return {
        "warmup_runs": settings.warmup_runs,
        "min_runs": settings.min_runs,
        "max_runs": settings.max_runs,
        "target_rel_iqr": settings.target_rel_iqr,
        "time_cap_s": settings.time_cap_s,
        "settle_ms": settings.settle_ms,
        "burst_runs": settings.burst_runs,
    }


def _protocol_kwargs(settings: ProtocolSettings) -> dict[str, Any]:
    return {**_kwargs(settings), "target_rel_se": settings.target_rel_se}


def measure(call: TimedCall, settings: ProtocolSettings | None = None) -> LatencySample:
    """Time one configuration with the adaptive protocol."""
    return measure_interleaved([call], settings)[0]


def measure_interleaved(
    calls: Sequence[TimedCall], settings: ProtocolSettings | None = None,
    lockstep: bool = False,
) -> list[LatencySample]:
    """Time several configurations round-robin; one ``LatencySample`` each, in order.
    ``lockstep``: all are timed until the last one stops (``bundle_runner.run_protocol``), for
    timings compared with each other."""
    if not calls:
        return []
    settings = settings or ProtocolSettings()
    times = _core.run_protocol(list(calls), **_protocol_kwargs(settings), lockstep=lockstep)
    return [to_sample(t) for t in times]


def measure_ratio(
    call: TimedCall, reference: TimedCall, settings: ProtocolSettings | None = None
) -> tuple[float, float]:
    """Paired alternating timing: (median of call/reference ratios, IQR of the ratios)."""
    settings = settings or ProtocolSettings()
    ratios = _core.ratio_protocol(call, reference, **_kwargs(settings))
    med, iqr, _, _ = _core.summarize(ratios)
    return med, iqr


def wall_clock_timer(fn: Callable[[], Any], calls_per_sample: int = 1) -> TimedCall:
    """Turn a zero-argument function into a timed call (``time.perf_counter_ns``, ms)."""
    import time

    n = max(1, int(calls_per_sample))
    perf = time.perf_counter_ns

    def timed() -> float:
        t0 = perf()
        for _ in range(n):
            fn()
        return (perf() - t0) / 1e6 / n

    return timed


def calls_per_sample(fn: Callable[[], Any], settings: ProtocolSettings) -> int:
    """How many calls one timed sample needs to last ``settings.min_sample_ms``."""
    return _core.calibrate_calls(fn, settings.min_sample_ms)
