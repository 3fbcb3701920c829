"""One exception hierarchy for everything autoprune raises on purpose.

Every error message names the bad value and, where there is one, the fix.
"""

from __future__ import annotations


class AutoPruneError(Exception):
    """Base class of every error autoprune raises deliberately."""


class InvalidInputError(AutoPruneError, ValueError):
    """An argument given by the user is out of range or of the wrong shape/type."""


class UnsupportedLayerError(AutoPruneError):
    """A module autoprune cannot analyse or prune. The message names its path and type."""

    def __init__(self, module_path: str, module_type: str, reason: str = "") -> None:
        self.module_path = module_path
        self.module_type = module_type
        msg = f"unsupported module {module_path!r} of type {module_type}"
        if reason:
            msg += f": {reason}"
        msg += f"; pass ignore=[{module_path!r}] to keep it unpruned"
        super().__init__(msg)


class InvalidPlanError(AutoPruneError, ValueError):
    """A pruning plan that does not fit the model (unknown group, bad ratio, bad structure)."""


class BackendUnavailable(AutoPruneError):
    """A backend whose runtime or hardware is missing. The message says what to install."""


class UnknownNameError(AutoPruneError, KeyError):
    """A name looked up in a registry that does not exist. The message lists the known names."""

    def __init__(self, kind: str, name: str, known: list[str]) -> None:
        self.kind, self.name, self.known = kind, name, sorted(known)
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(self.known)}")

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class TableMismatchError(AutoPruneError):
    """A latency table from another device, schema version or protocol."""


class TableMissError(AutoPruneError, KeyError):
    """A latency-table lookup found no entry and the miss policy is ``raise``."""

    def __str__(self) -> str:
        return str(self.args[0])


class CorruptFileError(AutoPruneError):
    """A file autoprune wrote (or was given) cannot be parsed. The message names file and line."""


class InfeasibleBudgetError(AutoPruneError):
    """No plan meets the latency budget: either the fastest plan in the search space is
    predicted above it (``measured=False``), or plans predicted within it all missed it when
    measured on the device (``measured=True``; ``fastest_ms`` is then the best measured)."""

    def __init__(self, budget_ms: float, fastest_ms: float, detail: str = "",
                 measured: bool = False) -> None:
        self.budget_ms, self.fastest_ms, self.measured = budget_ms, fastest_ms, measured
        if measured:
            msg = (
                f"latency budget {budget_ms:.4g} ms was not met when measured: the fastest "
                f"re-measured finalist ran {fastest_ms:.4g} ms on the device although plans were "
                "predicted within it; raise the budget, run more trials, or refit the latency "
                "predictor with more measured plans (predictor_samples=)"
            )
        else:
            msg = (
                f"latency budget {budget_ms:.4g} ms is unreachable: the fastest plan in the "
                f"search space is predicted at {fastest_ms:.4g} ms"
            )
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


class NotFittedError(AutoPruneError):
    """An estimator used before ``fit``."""


class SearchSpaceError(AutoPruneError, ValueError):
    """A search space (or YAML preset) with unknown keys, bad ranges or unknown groups."""


class StorageError(AutoPruneError):
    """A search storage (journal file or database) that cannot be opened or reached. The message
    names the file or host/port (never the password) and what to check."""


class ModelMismatchError(InvalidInputError):
    """A pruned model whose structure does not match its reference (a layer of another type,
    an extra or a missing layer, a layer wider than the reference's). The message names the
    first module that differs; ``module_path`` holds it."""

    def __init__(self, module_path: str, reason: str) -> None:
        self.module_path = module_path
        super().__init__(
            f"the pruned model does not match the reference at module {module_path!r}: {reason}; "
            "pass the dense model the pruned one was made from as reference"
        )
