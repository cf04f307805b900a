"""TBD losses (Tang et al., arXiv 2208.03006): the Harmony Score, the
quality-focal imitation of dense class scores, and the task-decoupled feature
mask and its dynamic balance. Conventions: see :mod:`d2_distill.losses.common`."""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import _acc_dtype, _check_same_shape

__all__ = ["harmony_score", "quality_focal_distill_loss", "tfd_mask", "tfd_balance"]


def harmony_score(scores: Tensor, ious: Tensor, quality_exp: float = 1.0) -> Tensor:
    """Harmony score of classification score s and localisation quality u.

    Same shape in and out (detached, in [0, 1]):

        HS(s, u) = (1 - |s - u|) * (s * u)^(gamma / 2),  gamma = ``quality_exp``

    s and u are clamped to [0, 1] first. gamma = 0 gives 1 - |s - u|.
    Accumulation dtype.
    """
    _check_same_shape("scores", scores, "ious", ious)
    if quality_exp < 0:
        raise ValueError(f"quality_exp must be >= 0, got {quality_exp!r}")
    with torch.no_grad():
        acc = _acc_dtype(scores, ious)
        s = scores.detach().to(acc).clamp(0.0, 1.0)
        u = ious.detach().to(acc).clamp(0.0, 1.0)
        hs = (1.0 - (s - u).abs()) * (s * u).pow(quality_exp / 2.0)
        return hs.clamp(0.0, 1.0)


def quality_focal_distill_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    """Elementwise quality-focal distillation loss on sigmoid logits.

    Any shape -> same shape (accumulation dtype, no reduction). With
    p = sigmoid(z_S / tau) and t = sigmoid(z_T / tau) (teacher detached):

        QF(p, t) = BCE(p, t) * |t - p|^2
        BCE(p, t) = -(t log p + (1 - t) log(1 - p))

    where BCE is computed stably from the logits
    (``binary_cross_entropy_with_logits(z_S / tau, t)``). Equal logits give 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    _check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    acc = _acc_dtype(student_logits, teacher_logits)
    zs = student_logits.to(acc) / temperature
    t = torch.sigmoid(teacher_logits.detach().to(acc) / temperature)
    p = torch.sigmoid(zs)
    bce = F.binary_cross_entropy_with_logits(zs, t, reduction="none")
    return bce * (t - p).square()


def tfd_mask(cls_prob: Tensor, max_iou: Tensor, cls_weight: Union[float, Tensor]) -> Tensor:
    """Teacher-quality spatial mask for feature distillation (detached).

    cls_prob (N, A, K, H, W) teacher class probabilities, max_iou (N, A, H, W)
    best IoU of each anchor's teacher box with the ground truth ->

        M = w * max_{a,c} cls_prob + (1 - w) * max_a max_iou     (N, H, W)

    ``cls_weight`` w is a Python float in [0, 1] (ValueError otherwise) or a
    0-dim tensor (clamped to [0, 1]; no host sync to check it). A or K == 0
    makes the corresponding max 0. Accumulation dtype.
    """
    if cls_prob.dim() != 5:
        raise ValueError(f"cls_prob must be (N, A, K, H, W), got {tuple(cls_prob.shape)}")
    if max_iou.dim() != 4:
        raise ValueError(f"max_iou must be (N, A, H, W), got {tuple(max_iou.shape)}")
    n, a, k, h, w = cls_prob.shape
    if tuple(max_iou.shape) != (n, a, h, w):
        raise ValueError(
            f"max_iou shape {tuple(max_iou.shape)} does not match cls_prob shape "
            f"{tuple(cls_prob.shape)} (expected {(n, a, h, w)})"
        )
    if isinstance(cls_weight, Tensor):
        if cls_weight.numel() != 1:
            raise ValueError(f"cls_weight tensor must be 0-dim, got shape {tuple(cls_weight.shape)}")
    else:
        cls_weight = float(cls_weight)
        if not 0.0 <= cls_weight <= 1.0:
            raise ValueError(f"cls_weight must be in [0, 1], got {cls_weight!r}")

    with torch.no_grad():
        acc = _acc_dtype(cls_prob, max_iou)
        if a * k > 0:
            cls_max = cls_prob.detach().to(acc).amax(dim=(1, 2))
        else:
            cls_max = cls_prob.new_zeros((n, h, w), dtype=acc)
        if a > 0:
            iou_max = max_iou.detach().to(acc).amax(dim=1)
        else:
            iou_max = max_iou.new_zeros((n, h, w), dtype=acc)
        if isinstance(cls_weight, Tensor):
            wt = cls_weight.detach().to(device=cls_max.device, dtype=acc).reshape(()).clamp(0.0, 1.0)
        else:
            wt = cls_weight
        return wt * cls_max + (1.0 - wt) * iou_max


def tfd_balance(cls_loss: Tensor, reg_loss: Tensor) -> Tensor:
    """Classification share of the two distillation losses (detached, 0-dim).

        w_cls = L_cls / (L_cls + L_reg)

    0.5 when L_cls + L_reg == 0 (no NaN); clamped to [0, 1]. The larger loss
    gets the larger share. Accumulation dtype.
    """
    with torch.no_grad():
        acc = _acc_dtype(cls_loss, reg_loss)
        c = cls_loss.detach().to(acc)
        r = reg_loss.detach().to(acc)
        total = c + r
        pos = total > 0
        w = torch.where(pos, c / torch.where(pos, total, torch.ones_like(total)),
                        torch.full_like(total, 0.5))
        return w.clamp(0.0, 1.0)
