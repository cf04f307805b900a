"""PKD loss (Cao et al., "PKD: General Distillation Framework for Object
Detectors via Pearson Correlation Coefficient", NeurIPS 2022).

Both feature maps are normalised per channel to zero mean and unit variance, so
the student imitates the teacher's correlation pattern, not its magnitudes: a
teacher whose FPN activations are on another scale (another backbone, another
normalisation, another detector family) gives the same loss as a rescaled copy.
Conventions: see :mod:`d2_distill.losses.common`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .common import _acc_dtype

__all__ = ["pkd_loss"]


def _standardise(x: Tensor, eps: float) -> Tensor:
    """(N, C, H, W) -> same shape: every channel, over (N, H, W) jointly, minus its
    mean and divided by (its unbiased std + eps). A channel with a single value has
    std 0 (not NaN)."""
    dims = (0, 2, 3)
    count = x.shape[0] * x.shape[2] * x.shape[3]
    centred = x - x.mean(dim=dims, keepdim=True)
    var = centred.square().sum(dim=dims, keepdim=True) / max(count - 1, 1)
    # clamped: the gradient of sqrt at 0 is infinite (a constant channel would give NaN)
    std = var.clamp(min=torch.finfo(var.dtype).tiny).sqrt()
    return centred / (std + eps)


def pkd_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], eps: float = 1e-6) -> Tensor:
    """Pearson-correlation feature imitation over pyramid levels.

    Per level l: student (N, C, H, W) (already through its adapter) and teacher
    (N, C, H, W). Each map is standardised per channel over (N, H, W) jointly,
    x_hat = (x - mean) / (std + eps) with the unbiased std, and

        L = sum_l mean_{n,c,h,w} (s_hat - t_hat)^2 / 2

    which equals sum_l (1 - Pearson r) averaged over channels, up to the factor
    (M - 1) / M of the unbiased estimator (M = N*H*W). Invariant to a positive
    per-channel scale and to any per-channel shift of either map; 0 when one map
    is such an affine image of the other. The teacher is detached. Returns a
    0-dim tensor in the accumulation dtype.

    Raises:
        ValueError: different numbers of levels, no level, a level that is not
            (N, C, H, W) or whose student and teacher shapes differ, or eps < 0.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if len(student) != len(teacher):
        raise ValueError(
            f"student and teacher must have the same number of levels, got {len(student)} and {len(teacher)}"
        )
    if len(student) == 0:
        raise ValueError("pkd_loss needs at least one level")
    acc = _acc_dtype(*student, *teacher)
    total = None
    for lvl, (fs, ft) in enumerate(zip(student, teacher)):
        if fs.dim() != 4:
            raise ValueError(f"level {lvl}: features must be (N, C, H, W), got {tuple(fs.shape)}")
        if fs.shape != ft.shape:
            raise ValueError(f"level {lvl}: student shape {tuple(fs.shape)} != teacher shape {tuple(ft.shape)}")
        s_hat = _standardise(fs.to(acc), eps)
        with torch.no_grad():
            t_hat = _standardise(ft.detach().to(acc), eps)
        diff = s_hat - t_hat
        # mean over an empty map is NaN; a sum over it is a graph-connected 0
        level = diff.square().sum() / (2.0 * max(diff.numel(), 1))
        total = level if total is None else total + level
    return total
