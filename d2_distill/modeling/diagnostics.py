"""Loss-scale diagnostics: how hard each distillation loss pulls on the student,
relative to the student's own detection losses, on the same parameters.

With ``DISTILL.DIAGNOSTICS.GRAD_PERIOD = N > 0`` the distiller logs, every N
iterations, ``distill/grad_ratio/<loss>/<part>`` = ‖∇_part L_distill‖ / ‖∇_part L_det‖
for every distillation loss (as trained: weighted and multiplied by r(t)) and
every part of the student (:func:`student_parts`), where L_det is the sum of the
student's detection losses. A ratio far above 1 means the distillation term
drowns the ground truth on that part; far below 1, that it barely acts. The
gradients are taken with ``torch.autograd.grad`` (nothing is accumulated into
``.grad``): the training step is unchanged. With N = 0 (the default) nothing is
computed.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

import torch
from torch import nn

__all__ = ["student_parts", "gradient_norm", "gradient_ratios"]


def student_parts(student: nn.Module) -> Dict[str, List[nn.Parameter]]:
    """The trainable parameters of the parts the ratios are reported for:
    ``backbone`` (with its FPN) and the head the detection losses are computed in:
    ``box_head`` (box head + box predictor of R-CNN ROI heads) or ``head``
    (RetinaNet's dense head). Parts without trainable parameters are left out."""
    parts: Dict[str, List[nn.Module]] = {"backbone": [student.backbone]}
    roi_heads = getattr(student, "roi_heads", None)
    if roi_heads is not None and hasattr(roi_heads, "box_predictor"):
        parts["box_head"] = [roi_heads.box_head, roi_heads.box_predictor]
    elif isinstance(getattr(student, "head", None), nn.Module):
        parts["head"] = [student.head]
    out = {}
    for name, modules in parts.items():
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        if params:
            out[name] = params
    return out


def gradient_norm(loss: torch.Tensor, params: Sequence[nn.Parameter]) -> torch.Tensor:
    """‖∂loss/∂params‖₂ over all of ``params`` (0 for parameters the loss does not
    reach); the graph is kept for the next call."""
    grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
    sq = [g.detach().float().square().sum() for g in grads if g is not None]
    return torch.stack(sq).sum().sqrt() if sq else loss.new_zeros((), dtype=torch.float32)


def gradient_ratios(
    detection_loss: torch.Tensor,
    distill_losses: Mapping[str, torch.Tensor],
    parts: Mapping[str, Sequence[nn.Parameter]],
) -> Dict[str, float]:
    """``{"<loss>/<part>": ‖∇_part distill‖ / ‖∇_part detection‖}`` for every
    distillation loss that requires grad and every part where the detection
    gradient is not zero."""
    out: Dict[str, float] = {}
    for part, params in parts.items():
        ref = float(gradient_norm(detection_loss, params))
        if ref <= 0:
            continue
        for name, loss in distill_losses.items():
            if loss.requires_grad:
                out[f"{name}/{part}"] = float(gradient_norm(loss, params)) / ref
    return out
