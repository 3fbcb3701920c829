"""The strategy registry: names → ``Strategy`` factories (kept apart from ``base`` so that
the interface module does not import its implementations)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autoprune.errors import InvalidInputError, UnknownNameError
from autoprune.strategies.base import Strategy


def _registry() -> dict[str, Callable[..., Strategy]]:
    from autoprune.strategies.greedy import GreedyStrategy
    from autoprune.strategies.optuna_strategy import OptunaStrategy
    from autoprune.strategies.rl import RLStrategy

    return {
        "tpe": lambda **kw: OptunaStrategy("tpe", **kw),
        "nsga2": lambda **kw: OptunaStrategy("nsga2", **kw),
        "motpe": lambda **kw: OptunaStrategy("motpe", **kw),
        "random": lambda **kw: OptunaStrategy("random", **kw),
        "rl": lambda **kw: RLStrategy(**kw),
        "greedy": lambda **kw: GreedyStrategy(**kw),
    }


STRATEGY_NAMES = ("tpe", "nsga2", "motpe", "random", "rl", "greedy")


def list_strategies() -> list[str]:
    return list(STRATEGY_NAMES)


def get_strategy(strategy: str | Strategy | Any, **options: Any) -> Strategy:
    """A ``Strategy`` from a registry name, a ``Strategy`` (returned as is), or any
    ``optuna.samplers.BaseSampler`` instance (wrapped; NSGA-II/III samplers run two
    objectives, others one). Unknown names raise ``UnknownNameError``."""
    import optuna

    if isinstance(strategy, Strategy):
        return strategy
    if isinstance(strategy, optuna.samplers.BaseSampler):
        from autoprune.strategies.optuna_strategy import OptunaStrategy

        return OptunaStrategy.from_sampler(strategy, **options)
    if not isinstance(strategy, str):
        raise InvalidInputError(
            f"strategy must be a name ({', '.join(STRATEGY_NAMES)}), a Strategy or an optuna "
            f"sampler, got {type(strategy).__name__}"
        )
    reg = _registry()
    if strategy not in reg:
        raise UnknownNameError("strategy", strategy, list(reg))
    return reg[strategy](**options)


__all__ = ["STRATEGY_NAMES", "get_strategy", "list_strategies"]
