"""Pure tensor building blocks of the distillation methods (TAR, TBD).

Every function here is stateless: it takes tensors (batch first) and returns
tensors, with no detectron2 state. Conventions shared by all of them:

* Vectorised: no Python loop over anchors, boxes or RoIs (loops over the few
  pyramid levels of a feature list are the only loops).
* Device and dtype agnostic: new tensors are created on the device of the
  inputs, never on the CPU; there is no ``.item()`` (no host sync). Losses and
  reductions are computed in at least float32 ("accumulation dtype": float32
  for float16 / bfloat16 / float32 inputs, float64 for float64 inputs), so
  half-precision inputs under autocast are fine.
* Empty inputs (0 boxes, 0 rows) never give NaN or inf: losses then return a
  zero that is still connected to the autograd graph of the inputs (a sum
  over an empty tensor), so that DDP sees every parameter as used.
* Teacher inputs are detached inside the functions; gates, masks and weights
  are returned detached.

Boxes are ``(x0, y0, x1, y1)`` in pixels.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SCHEDULE_KINDS",
    "schedule_factor",
    "gaussian_mask",
    "feature_imitation_loss",
    "rowwise_iou",
    "tar_cls_gate",
    "tar_reg_gate",
    "tar_cls_loss",
    "tar_reg_loss",
    "harmony_score",
    "quality_focal_distill_loss",
    "giou_loss_rowwise",
    "tfd_mask",
    "tfd_balance",
]

SCHEDULE_KINDS = ("linear", "step", "cosine", "constant")


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _acc_dtype(*tensors: Tensor) -> torch.dtype:
    """Accumulation dtype: float64 if any input is float64, float32 otherwise."""
    for t in tensors:
        if t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _check_boxes(name: str, boxes: Tensor) -> None:
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (R, 4), got {tuple(boxes.shape)}")


def _check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _check_rows(name: str, t: Tensor, rows: int) -> None:
    if t.dim() != 1 or t.shape[0] != rows:
        raise ValueError(f"{name} must have shape ({rows},), got {tuple(t.shape)}")


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den > 0``, 0 elsewhere; finite values and gradients."""
    pos = den > 0
    return torch.where(pos, num / torch.where(pos, den, torch.ones_like(den)), torch.zeros_like(num))


def _box_area(b: Tensor) -> Tensor:
    """(R, 4) -> (R,); inverted boxes (x1 < x0 or y1 < y0) have area 0."""
    return (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)


def _rowwise_inter_union(b1: Tensor, b2: Tensor):
    lt = torch.maximum(b1[:, :2], b2[:, :2])
    rb = torch.minimum(b1[:, 2:], b2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = _box_area(b1) + _box_area(b2) - inter
    return inter, union


# --------------------------------------------------------------------------- #
# schedule
# --------------------------------------------------------------------------- #
def schedule_factor(
    kind: str,
    it: int,
    max_iter: int,
    *,
    warmup_iters: int = 0,
    iters_per_epoch: int = 0,
) -> float:
    """Distillation-weight schedule factor r(t) in [0, 1] (a Python float).

    With t = ``it`` and T = ``max_iter``:

    * ``"linear"``:   r = 1 - t / T
    * ``"step"``:     r = 1 - floor(t / I) / E, I = ``iters_per_epoch`` (> 0),
      E = ceil(T / I): constant within an epoch, one step down per epoch.
    * ``"cosine"``:   r = 0.5 * (1 + cos(pi * t / T))
    * ``"constant"``: r = 1

    Past the end (t > T) the decaying kinds give 0 (``"constant"`` stays 1).
    If ``warmup_iters`` > 0, r is multiplied by min(1, t / warmup_iters).
    The result is clamped to [0, 1] (so t < 0 behaves like t = 0 for decay).

    Raises:
        ValueError: unknown ``kind`` (valid: :data:`SCHEDULE_KINDS`),
            ``max_iter`` <= 0, ``warmup_iters`` < 0, or ``kind == "step"``
            with ``iters_per_epoch`` <= 0.
    """
    if kind not in SCHEDULE_KINDS:
        raise ValueError(
            f"unknown schedule kind {kind!r}; valid kinds are: {', '.join(SCHEDULE_KINDS)}"
        )
    if max_iter <= 0:
        raise ValueError(f"max_iter must be > 0, got {max_iter!r}")
    if warmup_iters < 0:
        raise ValueError(f"warmup_iters must be >= 0, got {warmup_iters!r}")
    if kind == "step" and iters_per_epoch <= 0:
        raise ValueError(
            f"schedule kind 'step' needs iters_per_epoch > 0, got iters_per_epoch={iters_per_epoch!r}"
        )

    t = max(float(it), 0.0)
    T = float(max_iter)

    if kind == "constant":
        r = 1.0
    elif t > T:
        r = 0.0
    elif kind == "linear":
        r = 1.0 - t / T
    elif kind == "cosine":
        r = 0.5 * (1.0 + math.cos(math.pi * t / T))
    else:  # step
        ipe = int(iters_per_epoch)
        num_epochs = math.ceil(max_iter / ipe)
        r = 1.0 - (int(t) // ipe) / num_epochs

    if warmup_iters > 0:
        r *= min(1.0, t / float(warmup_iters))
    return float(min(max(r, 0.0), 1.0))


# --------------------------------------------------------------------------- #
# feature imitation
# --------------------------------------------------------------------------- #
def gaussian_mask(
    boxes: Tensor, height: int, width: int, stride: int, sigma_ratio: float = 0.25
) -> Tensor:
    """Gaussian foreground mask of one image on a feature map of stride ``stride``.

    Args:
        boxes: (K, 4) xyxy boxes in input-image pixels.
        height, width: H, W of the feature map.
        stride: feature-map stride in input pixels.
        sigma_ratio: rho.

    Returns:
        (H, W) float32 tensor on ``boxes.device`` (detached), with
        ``M[i, j] = max_k G_k(x, y)`` where (x, y) = ((j + 0.5) * stride,
        (i + 0.5) * stride) is the centre of cell (i, j) in image pixels and

            G_k = exp(-((x - cx_k)^2 / (2 sx_k^2) + (y - cy_k)^2 / (2 sy_k^2))),
            sx_k = max(rho * w_k, 1),  sy_k = max(rho * h_k, 1)

        (centre (cx, cy), width w, height h of box k; sigma at least 1 px).
        All zeros when K == 0. Values lie in [0, 1]; the maximum is over
        boxes (overlapping boxes do not add up).
    """
    height, width = int(height), int(width)
    device = boxes.device
    b = boxes.detach().reshape(-1, 4).to(torch.float32)
    if b.shape[0] == 0 or height <= 0 or width <= 0:
        return torch.zeros(max(height, 0), max(width, 0), dtype=torch.float32, device=device)

    cx = (b[:, 0] + b[:, 2]) * 0.5
    cy = (b[:, 1] + b[:, 3]) * 0.5
    sx = ((b[:, 2] - b[:, 0]).clamp(min=0) * sigma_ratio).clamp(min=1.0)
    sy = ((b[:, 3] - b[:, 1]).clamp(min=0) * sigma_ratio).clamp(min=1.0)

    xs = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) * stride  # (W,)
    ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) * stride  # (H,)
    ex = (xs[None, :] - cx[:, None]).square() / (2.0 * sx[:, None].square())  # (K, W)
    ey = (ys[None, :] - cy[:, None]).square() / (2.0 * sy[:, None].square())  # (K, H)
    # exp is monotone: max_k exp(-e_k) = exp(-min_k e_k)
    expo = (ey[:, :, None] + ex[:, None, :]).amin(dim=0)  # (H, W)
    return torch.exp(-expo)


def feature_imitation_loss(
    student: Sequence[Tensor], teacher: Sequence[Tensor], masks: Sequence[Tensor]
) -> Tensor:
    """Masked feature imitation over pyramid levels.

    Per level l: student (N, C, H, W) (after the adapter), teacher
    (N, C, H, W), mask (N, H, W) non-negative.

        L = sum_l sum_{n,h,w} M * ||F_S - F_T||_2^2 / C  /  max(sum_l sum M, 1)

    (squared L2 over channels at each position). The teacher and the masks are
    detached. Returns a 0-dim tensor in the accumulation dtype (float32, or
    float64 for float64 inputs); an all-zero mask gives exactly 0 with a
    zero gradient for the student.

    Raises:
        ValueError: different numbers of levels, no level, a level whose
            student and teacher shapes differ, or a mask that is not (N, H, W).
    """
    if not (len(student) == len(teacher) == len(masks)):
        raise ValueError(
            f"student, teacher and masks must have the same number of levels, "
            f"got {len(student)}, {len(teacher)} and {len(masks)}"
        )
    if len(student) == 0:
        raise ValueError("feature_imitation_loss needs at least one level")

    acc = _acc_dtype(*student, *teacher)
    num = None
    den = None
    for lvl, (fs, ft, m) in enumerate(zip(student, teacher, masks)):
        if fs.shape != ft.shape:
            raise ValueError(
                f"level {lvl}: student shape {tuple(fs.shape)} != teacher shape {tuple(ft.shape)}"
            )
        if fs.dim() != 4:
            raise ValueError(f"level {lvl}: features must be (N, C, H, W), got {tuple(fs.shape)}")
        n, c, h, w = fs.shape
        if tuple(m.shape) != (n, h, w):
            raise ValueError(
                f"level {lvl}: mask shape {tuple(m.shape)} != expected {(n, h, w)}"
            )
        diff = fs.to(acc) - ft.detach().to(acc)
        sq = diff.square().sum(dim=1) / max(c, 1)  # (N, H, W)
        mm = m.detach().to(acc)
        lvl_num = (sq * mm).sum()
        lvl_den = mm.sum()
        num = lvl_num if num is None else num + lvl_num
        den = lvl_den if den is None else den + lvl_den
    return num / den.clamp(min=1.0)


# --------------------------------------------------------------------------- #
# TAR: teacher-assisted RoI distillation
# --------------------------------------------------------------------------- #
def rowwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Row-aligned IoU: (R, 4), (R, 4) xyxy -> (R,).

    IoU_i = |b1_i ∩ b2_i| / |b1_i ∪ b2_i| (not pairwise). A zero-area union
    (e.g. two degenerate boxes) gives 0, never NaN. Accumulation dtype.
    """
    _check_boxes("boxes1", boxes1)
    _check_boxes("boxes2", boxes2)
    _check_same_shape("boxes1", boxes1, "boxes2", boxes2)
    acc = _acc_dtype(boxes1, boxes2)
    inter, union = _rowwise_inter_union(boxes1.to(acc), boxes2.to(acc))
    return _safe_div(inter, union)


def tar_cls_gate(student_logits: Tensor, teacher_logits: Tensor, gt_classes: Tensor) -> Tensor:
    """Classification gate: is the teacher more confident in the ground truth?

    (R, K+1), (R, K+1), (R,) int -> (R,) bool (no gradient):

        a_i = 1[ p_T,i(y_i) > p_S,i(y_i) ],  p = softmax(z) over the K+1 classes

    Ties give False.
    """
    _check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    if student_logits.dim() != 2:
        raise ValueError(f"logits must be (R, K+1), got {tuple(student_logits.shape)}")
    _check_rows("gt_classes", gt_classes, student_logits.shape[0])
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
    _check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    if student_logits.dim() != 2:
        raise ValueError(f"logits must be (R, K+1), got {tuple(student_logits.shape)}")
    rows = student_logits.shape[0]
    _check_rows("gate", gate, rows)
    acc = _acc_dtype(student_logits, teacher_logits)
    log_q = F.log_softmax(student_logits.to(acc) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().to(acc) / temperature, dim=-1)
    p = log_p.exp()
    # p_c = 0 terms (teacher logit -inf) contribute 0 instead of 0 * inf = NaN
    kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(log_q)).sum(dim=-1)  # (R,)
    weighted = (kl * gate.detach().to(acc)).sum()
    return weighted * (float(temperature) ** 2 / max(rows, 1))


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
    _check_same_shape("student_deltas", student_deltas, "teacher_deltas", teacher_deltas)
    if student_deltas.dim() != 2:
        raise ValueError(f"deltas must be (R, 4), got {tuple(student_deltas.shape)}")
    rows = student_deltas.shape[0]
    _check_rows("gate", gate, rows)
    acc = _acc_dtype(student_deltas, teacher_deltas)
    diff = student_deltas.to(acc) - teacher_deltas.detach().to(acc)
    ad = diff.abs()
    if beta < 1e-5:
        per = ad
    else:
        per = torch.where(ad < beta, 0.5 * diff.square() / beta, ad - 0.5 * beta)
    weighted = (per.sum(dim=-1) * gate.detach().to(acc)).sum()
    return weighted / max(rows, 1)


# --------------------------------------------------------------------------- #
# TBD / TFD helpers
# --------------------------------------------------------------------------- #
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


def giou_loss_rowwise(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Row-aligned generalised-IoU loss: (R, 4), (R, 4) xyxy -> (R,).

        L_i = 1 - GIoU_i,  GIoU = IoU - (|C| - |A ∪ B|) / |C|

    with C the smallest box enclosing A and B. Each ratio is taken as 0 when
    its denominator is 0, so degenerate (zero-area) boxes give finite values
    and finite gradients (two identical points: loss 1); identical boxes give
    exactly 0. Values lie in [0, 2]. Accumulation dtype.
    """
    _check_boxes("boxes1", boxes1)
    _check_boxes("boxes2", boxes2)
    _check_same_shape("boxes1", boxes1, "boxes2", boxes2)
    acc = _acc_dtype(boxes1, boxes2)
    b1 = boxes1.to(acc)
    b2 = boxes2.to(acc)
    inter, union = _rowwise_inter_union(b1, b2)
    iou = _safe_div(inter, union)
    lt = torch.minimum(b1[:, :2], b2[:, :2])
    rb = torch.maximum(b1[:, 2:], b2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    enclose = wh[:, 0] * wh[:, 1]
    giou = iou - _safe_div(enclose - union, enclose)
    return 1.0 - giou


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
