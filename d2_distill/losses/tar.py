"""TAR losses (Sun et al., arXiv 2006.13108): the adaptive gates of the RoI head
terms and the gated classification (KL) and regression (smooth L1) losses.
Conventions: see :mod:`d2_distill.losses.common`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import _acc_dtype, _check_rows, _check_same_shape, rowwise_iou

__all__ = ["tar_cls_gate", "tar_reg_gate", "tar_cls_loss", "tar_reg_loss", "tar_object_gate", "tar_bounded_reg_loss"]


def _check_rows_pair(kind: str, layout: str, student: Tensor, teacher: Tensor) -> int:
    """Student and teacher ``kind`` of the same 2-D shape ``layout``; returns the rows R."""
    _check_same_shape(f"student_{kind}", student, f"teacher_{kind}", teacher)
    if student.dim() != 2:
        raise ValueError(f"{kind} must be {layout}, got {tuple(student.shape)}")
    return student.shape[0]


def tar_cls_gate(student_logits: Tensor, teacher_logits: Tensor, gt_classes: Tensor) -> Tensor:
    """Classification gate: is the teacher more confident in the ground truth?

    (R, K+1), (R, K+1), (R,) int -> (R,) bool (no gradient):

        a_i = 1[ p_T,i(y_i) > p_S,i(y_i) ],  p = softmax(z) over the K+1 classes

    Ties give False.
    """
    rows = _check_rows_pair("logits", "(R, K+1)", student_logits, teacher_logits)
    _check_rows("gt_classes", gt_classes, rows)
    with torch.no_grad():
        acc = _acc_dtype(student_logits, teacher_logits)
        idx = gt_classes.detach().long()[:, None]
        ps = F.softmax(student_logits.detach().to(acc), dim=-1).gather(1, idx)[:, 0]
        pt = F.softmax(teacher_logits.detach().to(acc), dim=-1).gather(1, idx)[:, 0]
        return pt > ps


def tar_reg_gate(teacher_boxes: Tensor, reference_boxes: Tensor, gt_boxes: Tensor) -> Tensor:
    """Regression gate: does the teacher box fit the ground truth better?

    (R, 4) xyxy x 3 -> (R,) bool (no gradient):

        g_i = 1[ IoU(b_T,i, gt_i) > IoU(ref_i, gt_i) ]

    with row-aligned IoU (:func:`rowwise_iou`); degenerate boxes have IoU 0.
    """
    with torch.no_grad():
        iou_t = rowwise_iou(teacher_boxes.detach(), gt_boxes.detach())
        iou_r = rowwise_iou(reference_boxes.detach(), gt_boxes.detach())
        return iou_t > iou_r


def tar_cls_loss(
    student_logits: Tensor, teacher_logits: Tensor, gate: Tensor, temperature: float = 1.0
) -> Tensor:
    """Gated KL distillation of RoI class scores.

    (R, K+1), (R, K+1), (R,) gate (bool or float) -> 0-dim:

        L = tau^2 * sum_i a_i * KL(softmax(z_T,i / tau) || softmax(z_S,i / tau)) / max(R, 1)
        KL(p || q) = sum_c p_c (log p_c - log q_c)

    computed with log_softmax in the accumulation dtype. The normaliser is the
    number of rows R, not the number of open gates. Teacher and gate are
    detached; R == 0 gives a graph-connected 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    rows = _check_rows_pair("logits", "(R, K+1)", student_logits, teacher_logits)
    _check_rows("gate", gate, rows)
    acc = _acc_dtype(student_logits, teacher_logits)
    log_q = F.log_softmax(student_logits.to(acc) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().to(acc) / temperature, dim=-1)
    p = log_p.exp()
    # p_c = 0 terms (teacher logit -inf) contribute 0 instead of 0 * inf = NaN
    kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(log_q)).sum(dim=-1)  # (R,)
    weighted = (kl * gate.detach().to(acc)).sum()
    return weighted * (float(temperature) ** 2 / max(rows, 1))


def tar_object_gate(
    teacher_scores: Tensor, student_scores: Tensor, roi_objects: Tensor, num_objects: int,
    empty: bool = True,
) -> Tensor:
    """Per-object gate of the feature term: is the teacher better on this object?

    (R,), (R,), (R,) int, K -> (K,) bool (no gradient). ``roi_objects[i]`` is the
    object (0..K-1) that RoI i is matched to, or -1 for a RoI that counts for none
    (background). Over the RoIs of object k:

        g_k = 1[ mean_i teacher_scores_i > mean_i student_scores_i ]

    (a score is e.g. the probability of the object's class, or the IoU of the
    model's box with the object). An object with no RoI gets ``empty``. Ties give
    False.
    """
    rows = teacher_scores.shape[0]
    _check_rows("student_scores", student_scores, rows)
    _check_rows("roi_objects", roi_objects, rows)
    with torch.no_grad():
        acc = _acc_dtype(teacher_scores, student_scores)
        obj = roi_objects.detach().long()
        keep = obj >= 0
        idx = obj.clamp(min=0)
        diff = (teacher_scores.detach().to(acc) - student_scores.detach().to(acc)) * keep.to(acc)
        margin = torch.zeros(num_objects, dtype=acc, device=teacher_scores.device).index_add_(0, idx, diff)
        count = torch.zeros(num_objects, dtype=acc, device=teacher_scores.device).index_add_(0, idx, keep.to(acc))
        # sum_i (t_i - s_i) > 0  <=>  mean t > mean s (same count)
        return torch.where(count > 0, margin > 0, torch.full_like(margin, bool(empty), dtype=torch.bool))


def _smooth_l1(diff: Tensor, beta: float) -> Tensor:
    """Elementwise SmoothL1_beta; plain L1 for beta < 1e-5 (fvcore's convention)."""
    ad = diff.abs()
    if beta < 1e-5:
        return ad
    return torch.where(ad < beta, 0.5 * diff.square() / beta, ad - 0.5 * beta)


def tar_reg_loss(student_deltas: Tensor, teacher_deltas: Tensor, gate: Tensor, beta: float) -> Tensor:
    """Gated smooth-L1 distillation of box deltas.

    (R, 4), (R, 4), (R,) gate -> 0-dim:

        L = sum_i g_i * sum_{j<4} SmoothL1_beta(d_S,ij - d_T,ij) / max(R, 1)
        SmoothL1_beta(x) = 0.5 x^2 / beta  if |x| < beta  else  |x| - 0.5 beta

    ``beta`` < 1e-5 (in particular 0) means plain L1, as in fvcore's
    ``smooth_l1_loss``. Teacher and gate are detached.
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta!r}")
    rows = _check_rows_pair("deltas", "(R, 4)", student_deltas, teacher_deltas)
    _check_rows("gate", gate, rows)
    acc = _acc_dtype(student_deltas, teacher_deltas)
    per = _smooth_l1(student_deltas.to(acc) - teacher_deltas.detach().to(acc), beta)
    weighted = (per.sum(dim=-1) * gate.detach().to(acc)).sum()
    return weighted / max(rows, 1)


def tar_bounded_reg_loss(
    student_deltas: Tensor, teacher_deltas: Tensor, gt_deltas: Tensor, gate: Tensor, beta: float,
    margin: float = 0.0, *, return_open: bool = False,
):
    """Teacher-bounded regression (Chen et al., NeurIPS 2017, in smooth-L1 form).

    (R, 4) x 3, (R,) gate -> 0-dim:

        e_S,i = sum_j SmoothL1_beta(d_S,ij - d_gt,ij),  e_T,i likewise for d_T
        L = sum_i g_i * 1[e_S,i + margin > e_T,i] * e_S,i / max(R, 1)

    The student is pulled towards the *ground truth*, never towards the teacher,
    and only on the RoIs where its error exceeds the teacher's (the teacher is
    an upper bound on the error, not a target). Teacher, ground truth and gate
    are detached; the bound indicator carries no gradient. With ``return_open``
    returns ``(L, open)``, ``open`` the (R,) bool rows that count.
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta!r}")
    rows = _check_rows_pair("deltas", "(R, 4)", student_deltas, teacher_deltas)
    _check_same_shape("student_deltas", student_deltas, "gt_deltas", gt_deltas)
    _check_rows("gate", gate, rows)
    acc = _acc_dtype(student_deltas, teacher_deltas, gt_deltas)
    gt = gt_deltas.detach().to(acc)
    err_s = _smooth_l1(student_deltas.to(acc) - gt, beta).sum(dim=-1)
    with torch.no_grad():
        err_t = _smooth_l1(teacher_deltas.detach().to(acc) - gt, beta).sum(dim=-1)
        open_ = (err_s.detach() + margin > err_t) & gate.detach().bool()
    loss = (err_s * open_.to(acc)).sum() / max(rows, 1)
    return (loss, open_) if return_open else loss
