"""FEATURE: Gaussian-masked feature imitation, for any FPN teacher/student pair.

The student's backbone output is recorded by a forward hook; each level goes
through an adapter to the teacher's channels and imitates the teacher's feature,
weighted by a Gaussian around every GT box (DESIGN §3 and §4.1.2).
"""
from __future__ import annotations

from typing import Dict

import torch
from detectron2.config import CfgNode

from .base import DistillMethod, DistillStep, build_feature_imitation, gaussian_masks, register_method

__all__ = ["FeatureMethod"]


@register_method("FEATURE")
class FeatureMethod(DistillMethod):
    default_schedule = "linear"

    def __init__(self, cfg: CfgNode, student, teacher):
        super().__init__()
        c = cfg.DISTILL.FEATURE
        self.weight = c.WEIGHT
        self.sigma_ratio = c.GAUSSIAN_SIGMA_RATIO
        self.imitation = build_feature_imitation(
            self.weight, c.LEVELS, student, teacher, cfg.DISTILL.ADAPTER, "DISTILL.FEATURE.LEVELS"
        )

    @property
    def needs_teacher(self) -> bool:
        return self.weight > 0

    def install(self, recorder) -> None:
        recorder.record_output("features", "backbone")

    def forward(self, step: DistillStep) -> Dict[str, torch.Tensor]:
        if self.imitation is None:
            return {}
        feats = step.records["features"]
        masks = gaussian_masks(
            step.gt_instances,
            {k: feats[k].shape for k in self.imitation.levels},
            self.imitation.strides,
            self.sigma_ratio,
        )
        return {"loss_feat": self.weight * self.imitation(feats, step.teacher_features, masks)}
