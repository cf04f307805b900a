"""PKD: General Distillation Framework for Object Detectors via Pearson
Correlation Coefficient (Cao et al., NeurIPS 2022), for any FPN detector.

The student's backbone (FPN) output is recorded by a forward hook; on every
level both models output (or DISTILL.PKD.LEVELS), the student's map goes
through an adapter to the teacher's channels, both maps are standardised per
channel over (N, H, W), and the student imitates the teacher's standardised map
(:func:`d2_distill.losses.pkd_loss`):

    loss_pkd = WEIGHT * sum_l mean((s_hat - t_hat)^2) / 2

No ground-truth mask and no teacher head: only the teacher's backbone runs, so
it serves two-stage (GeneralizedRCNN) and one-stage (RetinaNet) pairs alike, and
teachers whose feature magnitudes differ from the student's.
"""
from __future__ import annotations

from typing import Dict

import torch
from detectron2.config import configurable

from ..losses import pkd_loss
from .base import DISTILL_METHOD_REGISTRY, DistillStep, FeatureLevelsMethod

__all__ = ["PKDMethod"]


@DISTILL_METHOD_REGISTRY.register()
class PKDMethod(FeatureLevelsMethod):
    name = "PKD"
    loss_names = ("loss_pkd",)
    # The paper keeps its loss weight fixed through training; a correlation target
    # does not become easier to match as the student improves, so it is not decayed.
    default_schedule = "constant"
    # DISTILL.PKD: WEIGHT (1.0, provisional: not yet tuned on the built-in dataset)
    # and LEVELS, from FeatureLevelsMethod.add_config.

    @configurable
    def __init__(self, *, student, teacher, weight: float = 1.0, levels=(), adapter: str = "conv1x1"):
        self.check_options(**locals())
        super().__init__(student=student, teacher=teacher, weight=weight, levels=levels, adapter=adapter)

    def forward(self, step: DistillStep) -> Dict[str, torch.Tensor]:
        if self.features is None:
            return {}
        student, teacher = self.features.pairs(step.records["features"], step.teacher_features)
        return {"loss_pkd": self.weight * pkd_loss(student, teacher)}
