"""FEATURE: Gaussian-masked feature imitation, for any FPN teacher/student pair.

The student's backbone output is recorded by a forward hook; each level goes
through an adapter to the teacher's channels and imitates the teacher's feature,
weighted by a Gaussian around every GT box (the feature term of TAR, on its own):

    L = sum_l sum_{n,h,w} M * ||adapter(F_S) - F_T||^2 / C  /  max(sum M, 1)

with M the max over GT boxes of exp(-(dx^2 / 2 sx^2 + dy^2 / 2 sy^2)),
sx = GAUSSIAN_SIGMA_RATIO * box width (at least 1 px), sy likewise.
"""
from __future__ import annotations

from typing import Dict

import torch
from detectron2.config import CfgNode, configurable

from .base import DISTILL_METHOD_REGISTRY, DistillStep, FeatureLevelsMethod

__all__ = ["FeatureMethod"]


@DISTILL_METHOD_REGISTRY.register()
class FeatureMethod(FeatureLevelsMethod):
    name = "FEATURE"
    loss_names = ("loss_feat",)
    default_schedule = "linear"
    positive = ("gaussian_sigma_ratio",)

    @classmethod
    def add_config(cls, cfg: CfgNode) -> CfgNode:
        c = super().add_config(cfg)  # WEIGHT, LEVELS
        # Gaussian sigma as a fraction of the box side (0.25: ~0.135 at the box edge).
        c.GAUSSIAN_SIGMA_RATIO = 0.25
        return c

    @configurable
    def __init__(self, *, student, teacher, weight: float = 1.0, levels=(), gaussian_sigma_ratio: float = 0.25,
                 adapter: str = "conv1x1"):
        self.check_options(**locals())
        super().__init__(student=student, teacher=teacher, weight=weight, levels=levels, adapter=adapter)
        self.sigma_ratio = gaussian_sigma_ratio

    def forward(self, step: DistillStep) -> Dict[str, torch.Tensor]:
        if self.features is None:
            return {}
        feats = step.records["features"]
        masks = self.features.gaussian_masks(step.gt_instances, feats, self.sigma_ratio)
        return {"loss_feat": self.weight * self.features.imitation_loss(feats, step.teacher_features, masks)}
