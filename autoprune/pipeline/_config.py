"""Typed, validated options of ``run_pipeline``'s search and fine-tuning steps.

``SearchConfig`` replaces the free-form ``search_options`` dict (and ``n_trials``),
``FinetuneOptions`` replaces ``finetune_options`` (and ``finetune_epochs``, ``distill``,
``train_device``). The old keyword arguments still work: ``from_options`` turns them into a
config, and an unknown or misplaced key is an error naming it and the field to use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from autoprune.errors import InvalidInputError


def _int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInputError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _positive(name: str, value: Any, *, zero: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and \
        math.isfinite(value) and (value >= 0 if zero else value > 0)
    if not ok:
        raise InvalidInputError(f"{name} must be a finite number {'>= 0' if zero else '> 0'}, "
                                f"got {value!r}")


def _mapping(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, Mapping):
        raise InvalidInputError(f"{name} must be a dict of keyword arguments or None, got "
                                f"{type(value).__name__}")


def _checked_options(arg: str, what: str, options: Mapping[str, Any] | None,
                     owned: Mapping[str, str], known: set[str], cls_name: str) -> dict[str, Any]:
    """``options`` (the old free-form dict ``arg``) as a dict, every key a field of
    ``cls_name`` that the pipeline does not set itself (else an error saying where it goes)."""
    _mapping(arg, options)
    opts = dict(options or {})
    for key in opts:
        if key in owned:
            raise InvalidInputError(f"{arg}[{key!r}] is set by the pipeline; pass {owned[key]}")
        if key not in known:
            raise InvalidInputError(f"unknown {what} {key!r}; {cls_name} has "
                                    f"{', '.join(sorted(known))}")
    return opts


#: search() arguments that run_pipeline sets itself: key -> what to pass instead
_SEARCH_OWNED = {
    "evaluator": "run_pipeline(search_evaluator=...)",
    "table": "run_pipeline(table=...)",
    "predictor": "run_pipeline(predictor=...)",
    "run_dir": "run_pipeline(run_dir=...) (the study lives in run_dir/search)",
    "seed": "run_pipeline(seed=...)",
    "progress": "run_pipeline(progress=...)",
    "spec": "nothing (the pipeline analyses the model)",
    "device": "run_pipeline(device=..., backend_options=...)",
    "latency_budget_ms": "run_pipeline(latency_budget_ms=... or budget_fraction=...)",
    "finalist_budget": "run_pipeline(latency_budget_ms=... or budget_fraction=..., "
                       "budget_headroom=...)",
}


@dataclass(frozen=True)
class SearchConfig:
    """The search step of ``run_pipeline``: ``n_trials`` (the study's total), the ``strategy``
    (name, ``Strategy`` or Optuna sampler) and its ``strategy_options``, the ``space`` (a
    ``SearchSpace``, preset name or YAML path; default built from the model) and its
    ``space_options`` (also used to anchor a fractional budget), the study ``storage`` and
    ``study_name`` (default: a journal in ``run_dir/search``), ``timeout_s``, and how finalists
    are re-measured (``autoprune.select_finalists``): ``n_finalists`` measured (more, up to
    ``max_remeasure``, while none meets the budget), proxies within ``proxy_tolerance`` of the
    best count as ties (larger plan first); ``verify_finalists=False`` chooses by prediction
    only (the verify step still measures the result). ``refine_top_k`` > 0 re-scores that many
    of the study's best plans with the accuracy proxy after ``refine_finetune_steps`` SGD steps
    on the training data (``autoprune.search(refine_evaluator=...)``; needs ``val_loader``) and
    takes finalists from them first: a proxy that still ranks plans at aggressive budgets,
    where accuracy after BatchNorm re-calibration alone sits near chance. ``budget_rounds=2``
    searches once more, with half the trials, when the chosen plan measures under 95% of the
    budget: at the first search's budget scaled by what it measured (at most 1.5x), keeping the
    second choice if it meets the budget with a proxy at least as good. Off by default (1): on
    the glyphs benchmark at 32² the second choice was never kept (BENCHMARKS.md).
    ``importance``: what the greedy warm start trades latency against (``autoprune.search``):
    ``"magnitude"`` (default, data-free) or ``"sensitivity"`` (the search proxy's drop per
    group, measured once into ``run_dir/sensitivity.csv``; needs ``val_loader``), or a path to
    such a table shared by several runs on the same model."""

    n_trials: int = 60
    strategy: Any = "tpe"
    strategy_options: Mapping[str, Any] | None = None
    space: Any = None
    space_options: Mapping[str, Any] | None = None
    storage: Any = None
    study_name: str | None = None
    timeout_s: float | None = None
    n_finalists: int = 1
    max_remeasure: int = 8
    proxy_tolerance: float = 0.01
    verify_finalists: bool = True
    refine_top_k: int = 0
    refine_finetune_steps: int = 50
    budget_rounds: int = 1
    importance: str | Path = "magnitude"

    def __post_init__(self) -> None:
        _int("SearchConfig.n_trials", self.n_trials, 1)
        _int("SearchConfig.refine_top_k", self.refine_top_k, 0)
        _int("SearchConfig.refine_finetune_steps", self.refine_finetune_steps, 1)
        _int("SearchConfig.budget_rounds", self.budget_rounds, 1)
        if self.budget_rounds > 2:
            raise InvalidInputError(f"SearchConfig.budget_rounds must be 1 or 2, got "
                                    f"{self.budget_rounds!r}")
        _int("SearchConfig.n_finalists", self.n_finalists, 1)
        _int("SearchConfig.max_remeasure", self.max_remeasure, 1)
        _positive("SearchConfig.proxy_tolerance", self.proxy_tolerance, zero=True)
        if self.timeout_s is not None:
            _positive("SearchConfig.timeout_s", self.timeout_s)
        _mapping("SearchConfig.strategy_options", self.strategy_options)
        _mapping("SearchConfig.space_options", self.space_options)
        if self.study_name is not None and not isinstance(self.study_name, str):
            raise InvalidInputError(f"SearchConfig.study_name must be a string, got "
                                    f"{self.study_name!r}")
        if not isinstance(self.importance, (str, Path)):
            raise InvalidInputError(f"SearchConfig.importance must be 'magnitude', "
                                    f"'sensitivity' or a path, got {self.importance!r}")
        if not isinstance(self.verify_finalists, bool):
            raise InvalidInputError(f"SearchConfig.verify_finalists must be True or False, got "
                                    f"{self.verify_finalists!r}")
        if self.space is not None and not isinstance(self.space, (str, Path)) and \
                not hasattr(self.space, "dense_plan"):
            raise InvalidInputError(f"SearchConfig.space must be a SearchSpace, a preset name or "
                                    f"a YAML path, got {type(self.space).__name__}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None,
                     **base: Any) -> SearchConfig:
        """The config for the old ``search_options`` dict (plus ``base`` fields such as
        ``n_trials``); a key that is no field is an error saying where it goes."""
        opts = _checked_options("search_options", "search option", options, _SEARCH_OWNED,
                                {f.name for f in fields(cls)}, "SearchConfig")
        if "n_trials" in opts and "n_trials" in base:
            raise InvalidInputError("n_trials given twice (search_options and n_trials=): "
                                    "pass it once, e.g. SearchConfig(n_trials=...)")
        return cls(**{**base, **opts})

    def search_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``autoprune.search`` for this config."""
        d = {f.name: getattr(self, f.name) for f in fields(self)
             if f.name not in ("refine_top_k", "refine_finetune_steps", "budget_rounds")}
        for k in ("strategy_options", "space_options"):
            d[k] = None if d[k] is None else dict(d[k])
        return d


#: finetune() arguments that run_pipeline sets itself: key -> what to pass instead
_FINETUNE_OWNED = {
    "epochs": "FinetuneOptions(epochs=...) or run_pipeline(finetune_epochs=...)",
    "teacher": "FinetuneOptions(distill=True) (the dense model is the teacher)",
    "device": "FinetuneOptions(train_device=...) or run_pipeline(train_device=...)",
    "checkpoint_dir": "nothing (the checkpoint lives in run_dir/finetune)",
    "val_loader": "run_pipeline(val_loader=...) with early_stopping_patience",
    "seed": "run_pipeline(seed=...)",
    "progress": "run_pipeline(progress=...)",
}


@dataclass(frozen=True)
class FinetuneOptions:
    """The fine-tuning step of ``run_pipeline``: ``epochs`` (0 skips it), ``distill`` (the
    dense model is the teacher), ``train_device`` (also where accuracy is evaluated), and the
    ``autoprune.finetune`` settings below; a field left None keeps ``finetune``'s default.
    ``early_stopping_patience`` lets ``val_loader`` steer training (best epoch, early stop)."""

    epochs: int = 3
    distill: bool = True
    train_device: str = "cpu"
    steps: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    weight_decay: float | None = None
    momentum: float | None = None
    warmup_steps: int | None = None
    kd_temperature: float | None = None
    kd_weight: float | None = None
    val_metric: Callable[[Any], float] | None = None
    early_stopping_patience: int | None = None
    restore_best: bool | None = None
    gradual: Any = None
    rewind: int | None = None
    bn_l1: float | None = None
    bn_recalibration_batches: int | None = None
    loss_fn: Callable[[Any, Any], Any] | None = None

    def __post_init__(self) -> None:
        _int("FinetuneOptions.epochs", self.epochs, 0)
        if not isinstance(self.distill, bool):
            raise InvalidInputError(f"FinetuneOptions.distill must be True or False, got "
                                    f"{self.distill!r}")
        if not isinstance(self.train_device, str):
            raise InvalidInputError(f"FinetuneOptions.train_device must be a device string "
                                    f"such as 'cpu' or 'cuda', got {self.train_device!r}")
        for name in ("steps", "early_stopping_patience"):
            if getattr(self, name) is not None:
                _int(f"FinetuneOptions.{name}", getattr(self, name), 1)
        for name in ("warmup_steps", "rewind", "bn_recalibration_batches"):
            if getattr(self, name) is not None:
                _int(f"FinetuneOptions.{name}", getattr(self, name), 0)
        for name in ("lr", "kd_temperature"):
            if getattr(self, name) is not None:
                _positive(f"FinetuneOptions.{name}", getattr(self, name))
        for name in ("weight_decay", "momentum", "bn_l1", "kd_weight"):
            if getattr(self, name) is not None:
                _positive(f"FinetuneOptions.{name}", getattr(self, name), zero=True)
        for name in ("val_metric", "loss_fn"):
            v = getattr(self, name)
            if v is not None and not callable(v):
                raise InvalidInputError(f"FinetuneOptions.{name} must be callable, got {v!r}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None,
                     **base: Any) -> FinetuneOptions:
        """The config for the old ``finetune_options`` dict (plus ``base`` fields such as
        ``epochs``); a key that is no field is an error saying where it goes."""
        opts = _checked_options(
            "finetune_options", "fine-tuning option", options, _FINETUNE_OWNED,
            {f.name for f in fields(cls)} - {"epochs", "distill", "train_device"},
            "FinetuneOptions")
        return cls(**{**base, **opts})

    def finetune_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``autoprune.finetune`` (the fields that are set; epochs,
        teacher and device are passed by the pipeline)."""
        skip = {"epochs", "distill", "train_device"}
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in skip and getattr(self, f.name) is not None}
