"""The fine-tuning loss: distillation from the dense model and the BatchNorm-L1 penalty.

::

    CE   = loss_fn(student_logits, targets)                 # cross-entropy by default
    KL   = sum_c p_t(c) * (log p_t(c) - log p_s(c)),  averaged over the batch
           with p_t = softmax(teacher_logits / T), p_s = softmax(student_logits / T)
    loss = (1 - w) * CE + w * T**2 * KL                      # w = kd_weight, T = kd_temperature
    loss += bn_l1 * sum(|gamma|) over every BatchNorm layer  # network slimming, when bn_l1 > 0

Without a teacher the loss is ``CE`` (+ the BN-L1 term). The ``T**2`` factor keeps the
gradient scale of the soft term independent of ``T`` (Hinton et al., 2015).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["bn_l1_penalty", "distillation_loss"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor | None,
    *,
    temperature: float = 4.0,
    weight: float = 0.5,
    loss_fn: LossFn | None = None,
) -> torch.Tensor:
    """``(1 - w) * CE + w * T**2 * KL(softmax(t/T) || softmax(s/T))`` (KL averaged over the batch).

    With ``targets=None`` only the soft term is used (``w`` is treated as 1).
    """
    t = float(temperature)
    kl = F.kl_div(
        F.log_softmax(student_logits / t, dim=-1),
        F.log_softmax(teacher_logits.detach() / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    soft = (t * t) * kl
    if targets is None:
        return soft
    hard = (loss_fn or F.cross_entropy)(student_logits, targets)
    return (1.0 - weight) * hard + weight * soft


def bn_l1_penalty(model: nn.Module) -> torch.Tensor:
    """``sum(|gamma|)`` over every BatchNorm layer's scale (0 when there is none)."""
    terms = [
        m.weight.abs().sum() for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None
    ]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()
