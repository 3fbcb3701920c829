"""Importance criteria: which channels (and which weights) survive pruning.

Every criterion scores two things:

- ``channel_scores(group)``: one score per channel of a torch-pruning dependency group (the
  channels of the group's root layer); channel pruning removes the lowest-scored channels.
- ``weight_scores(weight, grad, gamma)``: one score per weight element; ``nm`` and
  ``unstructured`` masks keep the highest-scored weights.

Built in (``IMPORTANCES``): ``l1``, ``l2`` (magnitude), ``taylor`` (|gradient x weight|, needs
gradients of a real loss, see ``needs_gradients``), ``bn_gamma`` (network slimming: |gamma| of
the BatchNorm layers in the group) and ``random`` (seeded).

What every criterion promises (``tests/test_importance_conformance.py`` checks each one):
scores are finite, non-negative floats, one per root channel of the group (``channel_scores``)
or per weight element (``weight_scores``); the same inputs give the same scores (for
``random``: a fresh instance with the same seed); scores belong to the channels, not to their
positions (permuting a group's channels consistently permutes its scores; all but ``random``);
the sign of a weight does not matter; the magnitude criteria rank channels the same way when
every weight is scaled by the same positive factor; a criterion that ``needs_gradients``
refuses to score without them (``InvalidInputError``).
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from typing import Any

import torch

from autoprune.errors import InvalidInputError, UnknownNameError

__all__ = [
    "IMPORTANCES",
    "BNGammaImportance",
    "Importance",
    "MagnitudeImportance",
    "RandomImportance",
    "TaylorImportance",
    "get_importance",
]


class Importance(ABC):
    """Base class of an importance criterion (subclass it to plug in your own)."""

    #: registry name
    name: str = ""
    #: whether ``apply_plan`` must run a forward/backward pass first (param.grad is read)
    needs_gradients: bool = False

    @abstractmethod
    def channel_scores(self, group: Any) -> torch.Tensor:
        """One score per root channel of a torch-pruning ``Group`` (higher = keep)."""

    @abstractmethod
    def weight_scores(
        self, weight: torch.Tensor, grad: torch.Tensor | None, gamma: torch.Tensor | None
    ) -> torch.Tensor:
        """One score per element of ``weight`` (higher = keep).

        ``gamma`` is the |scale| of a normalisation layer that follows the layer (one value per
        output row) or None.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _tp_group_scores(scorer: Any, group: Any) -> torch.Tensor | None:
    scores: torch.Tensor | None = scorer(group)
    if scores is None:
        return None
    return scores.detach().float().reshape(-1)


class MagnitudeImportance(Importance):
    """Lp norm of every weight attached to a channel across the whole group (p = 1 or 2)."""

    def __init__(self, p: int = 2) -> None:
        self.p = p
        self.name = f"l{p}"

    def channel_scores(self, group: Any) -> torch.Tensor:
        import torch_pruning as tp

        scores = _tp_group_scores(tp.importance.GroupMagnitudeImportance(p=self.p), group)
        if scores is None:  # a group without any weighted layer (should not happen)
            scores = torch.zeros(len(group[0].idxs))
        return scores

    def weight_scores(
        self, weight: torch.Tensor, grad: torch.Tensor | None, gamma: torch.Tensor | None
    ) -> torch.Tensor:
        return weight.detach().abs().pow(self.p)

    def __repr__(self) -> str:
        return f"MagnitudeImportance(p={self.p})"


class TaylorImportance(Importance):
    """First-order Taylor estimate of the loss change, |weight x gradient| (Molchanov et al.)."""

    name = "taylor"
    needs_gradients = True

    def channel_scores(self, group: Any) -> torch.Tensor:
        import torch_pruning as tp

        for dep, _ in group:
            w = getattr(dep.target.module, "weight", None)
            if isinstance(w, torch.Tensor) and w.requires_grad and w.grad is None:
                raise InvalidInputError(
                    f"taylor importance needs gradients, but {dep.target.name} has none: run "
                    "loss.backward() on a real batch first (apply_plan does it from "
                    "batch=(x, y)), or choose l1, l2, bn_gamma or random"
                )
        scores = _tp_group_scores(tp.importance.GroupTaylorImportance(), group)
        if scores is None:
            scores = torch.zeros(len(group[0].idxs))
        return scores

    def weight_scores(
        self, weight: torch.Tensor, grad: torch.Tensor | None, gamma: torch.Tensor | None
    ) -> torch.Tensor:
        if grad is None:
            raise InvalidInputError(
                "taylor importance needs gradients (grad=None given); apply_plan computes them "
                "from batch=(x, y)"
            )
        if grad.shape != weight.shape:
            raise InvalidInputError(
                f"taylor importance: grad of shape {tuple(grad.shape)} for a weight of shape "
                f"{tuple(weight.shape)}; pass the weight's own gradient"
            )
        return (weight.detach() * grad.detach()).abs()


class BNGammaImportance(Importance):
    """Network slimming: |gamma| of the BatchNorm layers in the group.

    Groups without a BatchNorm (plain MLPs, transformer blocks) fall back to L2 magnitude with a
    warning. For weight masks, |w| is scaled by the |gamma| of the BatchNorm that follows the
    layer (per output row), so rows feeding unimportant channels lose weights first.
    """

    name = "bn_gamma"

    def channel_scores(self, group: Any) -> torch.Tensor:
        import torch_pruning as tp

        scores = _tp_group_scores(tp.importance.BNScaleImportance(), group)
        if scores is None:
            root = group[0].dep.target.name
            warnings.warn(
                f"bn_gamma importance: group rooted at {root} has no BatchNorm; "
                "using L2 magnitude for it",
                stacklevel=3,
            )
            return MagnitudeImportance(2).channel_scores(group)
        return scores

    def weight_scores(
        self, weight: torch.Tensor, grad: torch.Tensor | None, gamma: torch.Tensor | None
    ) -> torch.Tensor:
        s = weight.detach().abs()
        if gamma is not None and gamma.numel() == s.shape[0]:
            s = s * gamma.detach().abs().reshape(-1, *([1] * (s.dim() - 1)))
        return s


class RandomImportance(Importance):
    """Uniform random scores from a seeded generator (a baseline)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed)

    def channel_scores(self, group: Any) -> torch.Tensor:
        return torch.rand(len(group[0].idxs), generator=self._gen)

    def weight_scores(
        self, weight: torch.Tensor, grad: torch.Tensor | None, gamma: torch.Tensor | None
    ) -> torch.Tensor:
        return torch.rand(weight.shape, generator=self._gen)

    def __repr__(self) -> str:
        return f"RandomImportance(seed={self.seed})"


IMPORTANCES: dict[str, type[Importance]] = {
    "l1": MagnitudeImportance,
    "l2": MagnitudeImportance,
    "taylor": TaylorImportance,
    "bn_gamma": BNGammaImportance,
    "random": RandomImportance,
}


def get_importance(importance: str | Importance, seed: int = 0) -> Importance:
    """An ``Importance`` from a registry name (l1, l2, taylor, bn_gamma, random) or as given."""
    if isinstance(importance, Importance):
        return importance
    if not isinstance(importance, str):
        raise InvalidInputError(
            f"importance must be a name ({', '.join(IMPORTANCES)}) or an Importance instance, "
            f"got {type(importance).__name__} {importance!r}"
        )
    if importance not in IMPORTANCES:
        raise UnknownNameError("importance", str(importance), list(IMPORTANCES))
    if importance == "l1":
        return MagnitudeImportance(1)
    if importance == "l2":
        return MagnitudeImportance(2)
    if importance == "random":
        return RandomImportance(seed)
    return IMPORTANCES[importance]()
