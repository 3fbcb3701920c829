"""Accuracy proxies for the search (higher is better).

Any ``Callable[[nn.Module], float]`` is an evaluator: the search applies each plan to a fresh
copy of the model and calls it (the evaluator may modify the model it is given). Built in:

- ``accuracy_evaluator(loader, ...)``: labelled top-1 accuracy after BatchNorm re-calibration
  (on by default: pruned models sit at chance until their BatchNorm statistics are re-estimated),
  optionally after a short fine-tune (``finetune_steps``);
- ``agreement_evaluator(dense_model, loader, metric="top1"|"kl")``: agreement with the dense
  model's predictions, for users without labels (``kl`` returns ``exp(-KL)`` in (0, 1]);
- ``ImportanceProxy(model, spec)``: a data-free proxy computed from the weights alone, the
  share of weight magnitude a plan keeps; used when ``search(evaluator=None)``. It needs no
  evaluation data and never builds the pruned model, but it only ranks plans by how much
  weight they remove, not by what the network computes.

A plan evaluator is any object with ``evaluate_plan(plan) -> float`` (``ImportanceProxy`` is
one); the search calls it directly instead of applying the plan.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast, runtime_checkable

import numpy as np

from autoprune.errors import InvalidInputError
from autoprune.types import ModelSpec, OpKind, Structure

if TYPE_CHECKING:
    import torch
    from torch import nn

    from autoprune.plan import PruningPlan

Evaluator = Callable[["nn.Module"], float]
AgreementMetric = Literal["top1", "kl"]


@runtime_checkable
class PlanEvaluator(Protocol):
    """Scores a plan without building the pruned model."""

    def evaluate_plan(self, plan: PruningPlan) -> float: ...


# --- data helpers ------------------------------------------------------------------------
def _split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (list, tuple)):
        if len(batch) >= 2:
            return batch[0], batch[1]
        return batch[0], None
    if isinstance(batch, dict):
        x = batch.get("input", batch.get("x", batch.get("image")))
        return x, batch.get("label", batch.get("y"))
    return batch, None


def _forward(model: nn.Module, x: Any) -> torch.Tensor:
    out = model(*x) if isinstance(x, (list, tuple)) else model(x)
    if isinstance(out, (list, tuple)):
        out = out[0]
    if hasattr(out, "logits"):
        out = out.logits
    return cast("torch.Tensor", out)


def recalibrate_batchnorm(model: nn.Module, loader: Iterable[Any], batches: int = 10,
                          device: Any = None,
                          inputs_of: Callable[[Any], Any] | None = None) -> nn.Module:
    """Re-estimate every BatchNorm's running mean/variance from ``batches`` batches
    (cumulative average, no gradient), in place; returns the model in eval mode. Only the
    BatchNorm layers run in training mode: dropout and stochastic depth stay off, so the
    statistics are those of the network that is evaluated. ``inputs_of(batch)``: the model
    inputs of a batch (a tensor, or a tuple of positional inputs); default: the first item of
    a tuple/list batch, or its ``input``/``x``/``image`` key."""
    import torch
    from torch import nn

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or batches <= 0:
        return model.eval()
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the calibration batches
    model.eval()
    for m in bns:
        m.train()
    try:
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if i >= batches:
                    break
                x = inputs_of(batch) if inputs_of is not None else _split_batch(batch)[0]
                _forward(model, _to_device(x, device))
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.eval()
    return model


def _to_device(x: Any, device: Any) -> Any:
    if device is None:
        return x
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    return x.to(device) if hasattr(x, "to") else x


def _short_finetune(model: nn.Module, loader: Iterable[Any], steps: int, lr: float,
                    device: Any = None) -> None:
    import torch

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                          momentum=0.9, weight_decay=1e-4)
    model.train()
    done = 0
    while done < steps:
        seen = False
        for batch in loader:
            seen = True
            x, y = _split_batch(batch)
            if y is None:
                raise InvalidInputError("the fine-tune proxy needs labelled batches (x, y); "
                                        "the calibration loader gave inputs only")
            x, y = _to_device(x, device), _to_device(y, device)
            loss = torch.nn.functional.cross_entropy(_forward(model, x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done >= steps:
                break
        if not seen:
            raise InvalidInputError("the fine-tune loader is empty")
    model.eval()


class AccuracyEvaluator:
    """Top-1 accuracy on ``loader`` after BatchNorm re-calibration on ``calib_loader``
    (default: ``loader``'s inputs; labels are not used for it) and an optional short
    fine-tune of ``finetune_steps`` SGD steps on ``calib_loader``. ``device`` (e.g. ``"cuda"``)
    is where the proxy computes; latency is measured on the target device either way."""

    def __init__(
        self,
        loader: Iterable[Any],
        calib_loader: Iterable[Any] | None = None,
        bn_recalibration_batches: int = 10,
        finetune_steps: int = 0,
        finetune_lr: float = 0.01,
        max_batches: int | None = None,
        device: str | None = None,
    ) -> None:
        self.loader = loader
        self.device = device
        self.calib_loader = calib_loader
        self.bn_recalibration_batches = bn_recalibration_batches
        self.finetune_steps = finetune_steps
        self.finetune_lr = finetune_lr
        self.max_batches = max_batches

    def __call__(self, model: nn.Module) -> float:
        import torch

        if self.bn_recalibration_batches < 0 or self.finetune_steps < 0:
            raise InvalidInputError("bn_recalibration_batches and finetune_steps must be >= 0")
        calib = self.calib_loader if self.calib_loader is not None else self.loader
        if self.device is not None:
            model.to(self.device)
        if self.finetune_steps > 0:
            _short_finetune(model, calib, self.finetune_steps, self.finetune_lr, self.device)
        recalibrate_batchnorm(model, calib, self.bn_recalibration_batches, self.device)
        correct = total = 0
        with torch.no_grad():
            for batch in itertools.islice(self.loader, self.max_batches):
                x, y = _split_batch(batch)
                if y is None:
                    raise InvalidInputError("accuracy_evaluator needs labelled batches (x, y); "
                                            "use agreement_evaluator for unlabelled data")
                pred = _forward(model, _to_device(x, self.device)).argmax(dim=-1)
                correct += int((pred.cpu() == y).sum())
                total += int(y.numel())
        if total == 0:
            raise InvalidInputError("the evaluation loader gave no samples")
        return correct / total


def accuracy_evaluator(
    loader: Iterable[Any],
    calib_loader: Iterable[Any] | None = None,
    bn_recalibration_batches: int = 10,
    finetune_steps: int = 0,
    finetune_lr: float = 0.01,
    max_batches: int | None = None,
    device: str | None = None,
) -> AccuracyEvaluator:
    """Labelled accuracy proxy (BatchNorm re-calibration on by default)."""
    return AccuracyEvaluator(loader, calib_loader, bn_recalibration_batches, finetune_steps,
                             finetune_lr, max_batches, device)


class AgreementEvaluator:
    """Agreement with the dense model on unlabelled data: share of equal top-1 predictions
    (``top1``) or ``exp(-mean KL(dense || pruned))`` (``kl``); both in [0, 1]."""

    def __init__(
        self,
        dense_model: nn.Module,
        loader: Iterable[Any],
        metric: AgreementMetric = "top1",
        calib_loader: Iterable[Any] | None = None,
        bn_recalibration_batches: int = 10,
        max_batches: int | None = None,
    ) -> None:
        self.dense_model = dense_model
        self.loader = loader
        self.metric = metric
        self.calib_loader = calib_loader
        self.bn_recalibration_batches = bn_recalibration_batches
        self.max_batches = max_batches
        self._dense_outputs: list[torch.Tensor] | None = None

    def _reference(self) -> list[torch.Tensor]:
        import torch

        if self._dense_outputs is None:
            self.dense_model.eval()
            outs = []
            with torch.no_grad():
                for batch in itertools.islice(self.loader, self.max_batches):
                    outs.append(_forward(self.dense_model, _split_batch(batch)[0]))
            if not outs:
                raise InvalidInputError("the evaluation loader gave no batches")
            self._dense_outputs = outs
        return self._dense_outputs

    def __call__(self, model: nn.Module) -> float:
        import torch

        if self.metric not in ("top1", "kl"):
            raise InvalidInputError(f"unknown agreement metric {self.metric!r}; allowed: top1, kl")
        ref = self._reference()
        calib = self.calib_loader if self.calib_loader is not None else self.loader
        recalibrate_batchnorm(model, calib, self.bn_recalibration_batches)
        agree = total = 0
        kl_sum = 0.0
        with torch.no_grad():
            for i, batch in enumerate(self.loader):
                if i >= len(ref):
                    break
                out = _forward(model, _split_batch(batch)[0])
                d = ref[i]
                if self.metric == "top1":
                    agree += int((out.argmax(-1) == d.argmax(-1)).sum())
                else:
                    p = torch.log_softmax(d, dim=-1)
                    q = torch.log_softmax(out, dim=-1)
                    kl_sum += float((p.exp() * (p - q)).sum())
                total += int(d.shape[0])
        if self.metric == "top1":
            return agree / total
        return math.exp(-kl_sum / total)


def agreement_evaluator(
    dense_model: nn.Module,
    loader: Iterable[Any],
    metric: AgreementMetric = "top1",
    calib_loader: Iterable[Any] | None = None,
    bn_recalibration_batches: int = 10,
    max_batches: int | None = None,
) -> AgreementEvaluator:
    """Label-free proxy: agreement of the pruned model with ``dense_model``."""
    return AgreementEvaluator(copy.deepcopy(dense_model), loader, metric, calib_loader,
                              bn_recalibration_batches, max_batches)


# --- data-free proxy ---------------------------------------------------------------------
class ImportanceProxy:
    """Share of weight magnitude a plan keeps, averaged over the model's weighted layers.

    Per layer: the ``l2`` (squared) or ``l1`` magnitude of the weights that survive the plan
    (kept output channels = the group's units with the largest magnitude, kept input channels
    from the upstream group, times the share a 2:4 or unstructured mask keeps), divided by the
    layer's total; layers of removed blocks keep 0. Needs no data; ``fit`` reads the weights
    once, ``evaluate_plan`` is pure numpy.
    """

    def __init__(self, model: nn.Module, spec: ModelSpec, criterion: Literal["l1", "l2"] = "l2"
                 ) -> None:
        self.model = model
        self.spec = spec
        self.criterion = criterion

    def fit(self) -> ImportanceProxy:
        if self.criterion not in ("l1", "l2"):
            raise InvalidInputError(f"unknown criterion {self.criterion!r}; allowed: l1, l2")
        modules = dict(self.model.named_modules())
        self.energy_: dict[str, np.ndarray] = {}
        self.nm_share_: dict[str, float] = {}
        self.sorted_cum_: dict[str, np.ndarray] = {}
        for name, lay in self.spec.layers.items():
            mod = modules.get(name)
            w = getattr(mod, "weight", None) if mod is not None else None
            if w is None or lay.spec.op == OpKind.ATTENTION or w.dim() < 2:
                continue
            a = w.detach().float().cpu().numpy()
            a = a * a if self.criterion == "l2" else np.abs(a)
            e = a.reshape(a.shape[0], a.shape[1], -1).sum(-1)  # out x in/groups
            total = float(e.sum())
            if total <= 0:
                continue
            self.energy_[name] = e / total
            flat = np.sort(a.ravel())[::-1]
            self.sorted_cum_[name] = np.cumsum(flat) / max(float(flat.sum()), 1e-30)
            self.nm_share_[name] = _nm_share(w.detach().float().cpu().numpy(), a, 2, 4)
        if not self.energy_:
            raise InvalidInputError(
                "ImportanceProxy found no weighted layer of the spec in the model; pass the "
                "model the spec was analysed from"
            )
        self.unit_scores_ = self._unit_scores()
        return self

    def _unit_scores(self) -> dict[str, np.ndarray]:
        scores: dict[str, np.ndarray] = {}
        for g in self.spec.groups.values():
            if g.kind != "channel":
                continue
            s = np.zeros(g.units)
            for p in g.producers:
                lay = self.spec.layers.get(p)
                e = self.energy_.get(p)
                if lay is None or e is None:
                    continue
                off = 0
                for gname, ch in lay.out_segments:
                    if gname == g.name and ch % g.units == 0 and off + ch <= e.shape[0]:
                        s += e[off:off + ch].sum(1).reshape(g.units, ch // g.units).sum(1)
                    off += ch
            scores[g.name] = s
        return scores

    def _masks(self, plan: PruningPlan) -> dict[str, np.ndarray]:
        """Per channel group, a 0/1 vector over units: the kept units (largest scores)."""
        kept = self.spec.kept_units(plan)
        out = {}
        for name, k in kept.items():
            g = self.spec.groups[name]
            if k >= g.units:
                continue
            m = np.zeros(g.units)
            m[np.argsort(-self.unit_scores_[name], kind="stable")[:k]] = 1.0
            out[name] = m
        return out

    @staticmethod
    def _channel_mask(segments: Any, masks: dict[str, np.ndarray], n: int) -> np.ndarray | None:
        if not any(gname in masks for gname, _ in segments):
            return None
        parts = []
        for gname, ch in segments:
            if gname in masks:
                m = masks[gname]
                parts.append(np.repeat(m, ch // len(m)) if ch % len(m) == 0 else np.ones(ch))
            else:
                parts.append(np.ones(ch))
        v = np.concatenate(parts)
        return v if v.shape[0] == n else None

    def evaluate_plan(self, plan: PruningPlan) -> float:
        if not hasattr(self, "energy_"):
            self.fit()
        masks = self._masks(plan)
        removed = {n for n, gp in plan.groups.items() if gp.structure == Structure.BLOCK}
        mask_of: dict[str, tuple[Structure, float]] = {}
        for name, gp in plan.groups.items():
            if gp.structure in (Structure.NM, Structure.UNSTRUCTURED) and name in self.spec.groups:
                for p in self.spec.groups[name].producers:
                    mask_of[p] = (gp.structure, gp.density)
        shares = []
        for name, e in self.energy_.items():
            lay = self.spec.layers[name]
            if lay.block is not None and lay.block in removed:
                shares.append(0.0)
                continue
            om = self._channel_mask(lay.out_segments, masks, e.shape[0])
            im = None
            if lay.spec.groups == 1:
                im = self._channel_mask(lay.in_segments, masks, e.shape[1])
            kept = e
            if om is not None:
                kept = kept * om[:, None]
            if im is not None:
                kept = kept * im[None, :]
            share = float(kept.sum())
            if name in mask_of:
                s, density = mask_of[name]
                if s == Structure.NM:
                    share *= self.nm_share_[name]
                else:
                    cum = self.sorted_cum_[name]
                    share *= float(cum[max(0, min(len(cum) - 1, round(density * len(cum)) - 1))])
            shares.append(share)
        return float(np.mean(shares))

    def __call__(self, model: nn.Module) -> float:
        raise InvalidInputError(
            "ImportanceProxy scores plans, not models: call evaluate_plan(plan)"
        )


def _nm_share(w: np.ndarray, a: np.ndarray, n: int, m: int) -> float:
    """Share of magnitude ``a`` kept by an n:m mask along the input dimension of ``w``."""
    if w.ndim == 4:  # conv: group the input channels at each kernel position, like a GEMM row
        a = a.transpose(0, 2, 3, 1).reshape(a.shape[0], -1)
    else:
        a = a.reshape(a.shape[0], -1)
    cols = a.shape[1] - a.shape[1] % m
    if cols == 0:
        return 1.0
    blocks = a[:, :cols].reshape(a.shape[0], -1, m)
    top = np.sort(blocks, axis=-1)[..., m - n:].sum()
    rest = a[:, cols:].sum()
    return float((top + rest) / max(float(a.sum()), 1e-30))
