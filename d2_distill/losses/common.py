"""Shared pieces of the distillation losses: dtype/shape helpers, row-aligned
box overlaps, the Gaussian GT mask and the masked feature imitation loss.

Conventions shared by every function of :mod:`d2_distill.losses`:

* Vectorised: no Python loop over anchors, boxes or RoIs (loops over the few
  pyramid levels of a feature list are the only loops).
* Device and dtype agnostic: new tensors are created on the device of the
  inputs; there is no ``.item()`` (no host sync). Losses and reductions are
  computed in at least float32 (the "accumulation dtype": float32 for
  float16 / bfloat16 / float32 inputs, float64 for float64 inputs), so
  half-precision inputs under autocast are fine.
* Empty inputs (0 boxes, 0 rows) never give NaN or inf: losses then return a
  zero that is still connected to the autograd graph of the inputs (a sum
  over an empty tensor), so that DDP sees every parameter as used.
* Teacher inputs are detached inside the functions; gates, masks and weights
  are returned detached.

Boxes are ``(x0, y0, x1, y1)`` in pixels.
"""
from __future__ import annotations

import contextlib
import math

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

__all__ = ["gaussian_mask", "gaussian_masks", "feature_imitation_loss", "masked_standardize", "rowwise_iou", "giou_loss_rowwise"]


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


def _no_autocast(device: torch.device):
    """A context that switches autocast off on ``device`` where it is on (else nothing)."""
    kind = device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.autocast(device_type=kind, enabled=False)
    return contextlib.nullcontext()


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


# Gaussian mask values below this are 0. Far from its box a Gaussian reaches
# subnormal floats (below 1.2e-38), and every product with a subnormal runs
# about 100x slower on CPUs, which made the feature loss's backward cost more
# than the rest of the method; next to the peak of 1, a float32 sum cannot see a
# term of 1e-12.
GAUSSIAN_FLOOR = 1e-12
_GAUSSIAN_CAP = -math.log(GAUSSIAN_FLOOR) + 1.0  # exponent cap: exp(-cap) < floor


def gaussian_mask(
    boxes: Tensor, height: int, width: int, stride: int, sigma_ratio: float = 0.25,
    *, weights: Optional[Tensor] = None,
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
        boxes (overlapping boxes do not add up); values below
        ``GAUSSIAN_FLOOR`` (1e-12) are 0 (the far tail, which would otherwise
        fill the map with slow subnormal floats).

        ``weights`` (K,) in [0, 1], optional: ``M = max_k w_k * G_k`` instead
        (a per-object gate: w_k = 0 removes box k's Gaussian).
    """
    if weights is not None and weights.reshape(-1).shape[0] != boxes.reshape(-1, 4).shape[0]:
        raise ValueError(f"weights must have shape ({boxes.reshape(-1, 4).shape[0]},), got {tuple(weights.shape)}")
    return gaussian_masks([boxes], height, width, stride, sigma_ratio,
                          weights=None if weights is None else [weights])[0]


def gaussian_masks(
    boxes: Sequence[Tensor], height: int, width: int, stride: int, sigma_ratio: float = 0.25,
    *, weights: Optional[Sequence[Tensor]] = None,
) -> Tensor:
    """:func:`gaussian_mask` of N images at once: ``boxes`` per image (K_n, 4),
    ``weights`` per image (K_n,) or None -> (N, H, W), image n's mask equal to
    ``gaussian_mask(boxes[n], ..., weights=weights[n])`` to the last bit (the
    boxes are padded to the largest K with entries that never win the max)."""
    height, width = int(height), int(width)
    n = len(boxes)
    device = boxes[0].device if n else torch.device("cpu")
    counts = [int(b.reshape(-1, 4).shape[0]) for b in boxes]
    k = max(counts, default=0)
    if k == 0 or height <= 0 or width <= 0:
        return torch.zeros(n, max(height, 0), max(width, 0), dtype=torch.float32, device=device)
    b = pad_sequence([x.detach().reshape(-1, 4).to(device=device, dtype=torch.float32) for x in boxes],
                     batch_first=True)  # (N, K, 4)
    valid = torch.arange(k, device=device)[None, :] < torch.tensor(counts, device=device)[:, None]  # (N, K)

    cx = (b[..., 0] + b[..., 2]) * 0.5  # (N, K)
    cy = (b[..., 1] + b[..., 3]) * 0.5
    sx = ((b[..., 2] - b[..., 0]).clamp(min=0) * sigma_ratio).clamp(min=1.0)
    sy = ((b[..., 3] - b[..., 1]).clamp(min=0) * sigma_ratio).clamp(min=1.0)

    xs = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) * stride  # (W,)
    ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) * stride  # (H,)
    ex = (xs[None, None, :] - cx[..., None]).square() / (2.0 * sx[..., None].square())  # (N, K, W)
    ey = (ys[None, None, :] - cy[..., None]).square() / (2.0 * sy[..., None].square())  # (N, K, H)
    ey = ey.masked_fill(~valid[..., None], float("inf"))  # padding: exponent +inf, Gaussian 0
    if weights is not None:
        w = pad_sequence([x.detach().reshape(-1).to(device=device, dtype=torch.float32) for x in weights],
                         batch_first=True)  # (N, K), 0 on the padding
        # the exponent capped just past the floor: no subnormal exp in the (N, K, H, W) tensor
        expo = (ey[..., :, None] + ex[..., None, :]).clamp(max=_GAUSSIAN_CAP)
        mask = (w[..., None, None] * torch.exp(-expo)).amax(dim=1)
    else:
        # exp is monotone: max_k exp(-e_k) = exp(-min_k e_k)
        mask = torch.exp(-(ey[..., :, None] + ex[..., None, :]).amin(dim=1))  # (N, H, W)
    return mask.masked_fill_(mask < GAUSSIAN_FLOOR, 0.0)


STANDARDIZE_EPS = 1e-6  # the variance floor of masked_standardize and the standardised imitation


def masked_standardize(x: Tensor, mask: Tensor, eps: float = STANDARDIZE_EPS) -> Tensor:
    """Per-channel standardisation of feature maps inside a soft mask.

    x (N, C, H, W), mask (N, H, W) non-negative -> (N, C, H, W):

        x_hat = (x - mu) / sqrt(var + eps),
        mu = sum_hw M x / sum_hw M,  var = sum_hw M (x - mu)^2 / sum_hw M

    per image n and channel c (the mask-weighted mean and variance). An image
    whose mask is all zero gets mu = var = 0. The mask is detached.
    """
    n, c, h, w = x.shape
    with _no_autocast(x.device):
        flat = _masked_standardize_flat(x.reshape(n, c, h * w), _mask_weights(mask.reshape(n, h * w), x.dtype), eps)
    return flat.view(n, c, h, w)


def _mask_weights(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(N, HW) soft mask -> (N, HW, 1) weights M / sum_hw M (0 where the sum is 0), detached."""
    m = mask.detach().to(dtype)
    total = m.sum(dim=1, keepdim=True)
    return _safe_div(m, total.expand_as(m)).unsqueeze(-1)


def _masked_standardize_flat(x: Tensor, weights: Tensor, eps: float) -> Tensor:
    """(N, C, HW) standardised per image and channel with (N, HW, 1) normalised weights:
    the mask-weighted moments as two batched mat-vec products (few full-size ops,
    so that the backward stays cheap)."""
    mu = torch.bmm(x, weights)  # (N, C, 1)
    centred = x - mu
    var = torch.bmm(centred.square(), weights)
    return centred * torch.rsqrt(var + eps)


def feature_imitation_loss(
    student: Sequence[Tensor], teacher: Sequence[Tensor], masks: Sequence[Tensor],
    *, standardize: bool = False,
) -> Tensor:
    """Masked feature imitation over pyramid levels.

    Per level l: student (N, C, H, W) (after the adapter), teacher
    (N, C, H, W), mask (N, H, W) non-negative.

        L = sum_l sum_{n,h,w} M * ||F_S - F_T||_2^2 / C  /  max(sum_l sum M, 1)

    (squared L2 over channels at each position). With ``standardize`` both maps
    are first standardised per image and channel inside the mask
    (:func:`masked_standardize`), so only the pattern of each channel within the
    masked region is imitated, not the two networks' feature scales; each
    position then costs about 2 (1 - Pearson r) per channel. The teacher and the masks are
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
    # autocast would run the batched products in half precision: off (the inputs are
    # cast to the accumulation dtype)
    with _no_autocast(student[0].device):
        return _feature_imitation_loss(student, teacher, masks, standardize, acc)


def _feature_imitation_loss(student, teacher, masks, standardize: bool, acc: torch.dtype) -> Tensor:
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
        # (N, C, HW) views: the mask reductions are batched mat-vec products
        fs, ft = fs.to(acc).reshape(n, c, h * w), ft.detach().to(acc).reshape(n, c, h * w)
        mm = m.detach().to(acc).reshape(n, h * w, 1)
        if standardize:
            weights = _mask_weights(mm[..., 0], acc)
            with torch.no_grad():
                ft = _masked_standardize_flat(ft, weights, STANDARDIZE_EPS)
            fs = _masked_standardize_flat(fs, weights, STANDARDIZE_EPS)
        sq = torch.bmm((fs - ft).square(), mm)  # (N, C, 1): sum_hw M (F_S - F_T)^2
        lvl_num = sq.sum() / max(c, 1)
        lvl_den = mm.sum()
        num = lvl_num if num is None else num + lvl_num
        den = lvl_den if den is None else den + lvl_den
    return num / den.clamp(min=1.0)
