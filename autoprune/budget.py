"""One latency budget: milliseconds on the device, or a share of the dense model's latency.

``Budget.of(latency_budget_ms=..., budget_fraction=..., headroom=...)`` is the one place a
budget is validated; ``met_by`` is the one place a measurement is compared with it. A budget
in milliseconds is checked against a latency; a fraction against a paired ratio (model /
dense, timed alternately), which a drifting machine cannot move. ``headroom`` is kept below
the budget by the stages that choose a plan, so that a fresh, noisy verification stays on the
right side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from autoprune.errors import InvalidInputError


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(
            value, "__float__"):
        raise InvalidInputError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise InvalidInputError(f"{name} must be finite, got {value!r}")
    return v


@dataclass(frozen=True)
class Budget:
    """``ms`` (absolute, on the device) or ``fraction`` (of dense, in (0, 1]), and
    ``headroom`` in [0, 0.5). Build with :meth:`of`, which validates."""

    ms: float | None = None
    fraction: float | None = None
    headroom: float = 0.0

    @classmethod
    def of(cls, latency_budget_ms: Any = None, budget_fraction: Any = None,
           headroom: Any = 0.0) -> Budget:
        if (latency_budget_ms is None) == (budget_fraction is None):
            raise InvalidInputError(
                "give exactly one of latency_budget_ms (milliseconds on the device, e.g. 8.0) "
                "and budget_fraction (a share of the dense model's latency, e.g. 0.5)")
        h = _number("budget headroom", headroom)
        if not 0.0 <= h < 0.5:
            raise InvalidInputError(f"budget headroom must be in [0, 0.5), got {headroom!r}")
        if latency_budget_ms is not None:
            ms = _number("latency_budget_ms", latency_budget_ms)
            if ms <= 0:
                raise InvalidInputError(
                    f"latency_budget_ms must be a positive number of milliseconds, got "
                    f"{latency_budget_ms!r}")
            return cls(ms=ms, headroom=h)
        f = _number("budget_fraction", budget_fraction)
        if not 0.0 < f <= 1.0:
            raise InvalidInputError(
                f"budget_fraction is a share of the dense model's latency and must be in "
                f"(0, 1], got {budget_fraction!r}; for an absolute budget pass "
                "latency_budget_ms")
        return cls(fraction=f, headroom=h)

    @property
    def is_fraction(self) -> bool:
        return self.fraction is not None

    def target_ratio(self) -> float:
        """The share of dense a chosen plan must reach (the fraction less the headroom)."""
        if self.fraction is None:
            raise InvalidInputError("an absolute budget has no ratio; use target_ms(dense_ms)")
        return self.fraction * (1.0 - self.headroom)

    def limit_ms(self, dense_ms: float | None = None) -> float:
        """The budget in milliseconds (a fraction needs the dense latency it is a share of)."""
        if self.ms is not None:
            return self.ms
        if dense_ms is None:
            raise InvalidInputError("a fractional budget needs the dense latency (dense_ms)")
        return float(self.fraction) * float(dense_ms)  # type: ignore[arg-type]

    def target_ms(self, dense_ms: float | None = None) -> float:
        """``limit_ms`` less the headroom: what a stage choosing a plan aims below."""
        return self.limit_ms(dense_ms) * (1.0 - self.headroom)

    def met_by(self, latency_ms: float | None = None, ratio: float | None = None,
               dense_ms: float | None = None) -> bool:
        """Whether a measurement meets the budget (not the headroom): a fraction is checked on
        the paired ``ratio`` (model / dense), milliseconds on ``latency_ms`` (or ``ratio`` x
        ``dense_ms`` when only those are known)."""
        if self.fraction is not None:
            if ratio is None:
                if latency_ms is None or dense_ms is None:
                    raise InvalidInputError(
                        "a fractional budget is checked on a paired ratio (or latency_ms and "
                        "dense_ms)")
                ratio = latency_ms / dense_ms
            return bool(ratio <= self.fraction)
        if latency_ms is None:
            if ratio is None or dense_ms is None:
                raise InvalidInputError("an absolute budget is checked on latency_ms (or ratio "
                                        "and dense_ms)")
            latency_ms = ratio * dense_ms
        return bool(latency_ms <= float(self.ms))  # type: ignore[arg-type]

    def __str__(self) -> str:
        core = f"{self.ms:.4g} ms" if self.ms is not None else f"{self.fraction:.0%} of dense"
        return core + (f" (headroom {self.headroom:.0%})" if self.headroom else "")


__all__ = ["Budget"]
