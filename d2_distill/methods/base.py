"""What a distillation method is, and the pieces methods share.

A method is a small ``nn.Module`` that
* checks, from the two configs alone, that it can serve a teacher/student pair
  (``check_configs``; runs before any weights are loaded);
* declares what it records on the student (``install``: forward hooks through a
  :class:`~d2_distill.modeling.capture.Recorder`);
* owns its trainable adapters (so they are saved with the distiller, never with
  the student);
* computes its losses from a :class:`DistillStep` (``forward``), each already
  multiplied by its own weight; the distiller multiplies them by r(t).

Shared pieces live here once: the adapter builder, :class:`FeatureImitation`
(adapters + the feature imitation loss of DESIGN §3) and the Gaussian GT masks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.structures import ImageList, Instances
from detectron2.utils.registry import Registry
from torch import nn

from .functional import feature_imitation_loss, gaussian_mask

__all__ = [
    "DISTILL_METHOD_REGISTRY",
    "register_method",
    "DistillMethod",
    "DistillStep",
    "FeatureImitation",
    "build_adapter",
    "build_feature_imitation",
    "gaussian_masks",
    "check_same",
]

DISTILL_METHOD_REGISTRY = Registry("DISTILL_METHOD")
DISTILL_METHOD_REGISTRY.__doc__ = "Distillation methods, by DISTILL.METHOD name."


def register_method(name: str):
    """Class decorator: register a DistillMethod under the DISTILL.METHOD value ``name``."""

    def deco(cls):
        DISTILL_METHOD_REGISTRY._do_register(name, cls)
        cls.method_name = name
        return cls

    return deco


@dataclass
class DistillStep:
    """Everything a method may use in one training step."""

    batched_inputs: Sequence[Dict[str, Any]]
    gt_instances: List[Instances]  # on the model's device, in input-image pixels
    student_losses: Dict[str, torch.Tensor]
    records: Dict[str, Any]  # what the method's hooks recorded on the student
    teacher_images: ImageList
    teacher_features: Dict[str, torch.Tensor]  # detached, not cropped
    extras: Dict[str, Any] = field(default_factory=dict)


class DistillMethod(nn.Module):
    """Base class. Subclasses are registered in ``DISTILL_METHOD_REGISTRY``."""

    default_schedule: str = "linear"

    @staticmethod
    def check_configs(student_cfg: CfgNode, teacher_cfg: CfgNode) -> None:
        """Raise ValueError naming what differs if the pair cannot be served."""

    def install(self, recorder) -> None:
        """Attach the recorders the method needs to the student."""

    def before_student(self, step: DistillStep) -> None:
        """Runs after the teacher's backbone and before the student's forward."""

    @property
    def needs_teacher(self) -> bool:
        return True

    def forward(self, step: DistillStep) -> Dict[str, torch.Tensor]:
        raise NotImplementedError


def check_same(what: str, student_value, teacher_value, method: str) -> None:
    if student_value != teacher_value:
        raise ValueError(
            f"DISTILL.METHOD={method} needs the same {what} in teacher and student: "
            f"student has {student_value!r}, teacher has {teacher_value!r}"
        )


def build_adapter(kind: str, in_channels: int, out_channels: int, level: str = "") -> nn.Module:
    """Student channels -> teacher channels. Zero bias, Xavier-style weights, so the
    adapted feature starts at the student's scale."""
    if kind == "none":
        if in_channels != out_channels:
            raise ValueError(
                f"DISTILL.ADAPTER='none' needs equal channels, but level {level!r} has "
                f"{in_channels} student vs {out_channels} teacher channels; use 'conv1x1' or 'conv3x3'"
            )
        return nn.Identity()
    if kind not in ("conv1x1", "conv3x3"):
        raise ValueError(f"DISTILL.ADAPTER={kind!r} is not one of 'conv1x1', 'conv3x3', 'none'")
    k = 1 if kind == "conv1x1" else 3
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=k, padding=k // 2)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    nn.init.zeros_(conv.bias)
    return conv


def _check_levels(levels: Sequence[str], student: Mapping[str, ShapeSpec], teacher: Mapping[str, ShapeSpec], option: str):
    for lvl in levels:
        if lvl not in student or lvl not in teacher:
            raise ValueError(
                f"{option}: level {lvl!r} is not an output of both backbones "
                f"(student: {sorted(student)}, teacher: {sorted(teacher)})"
            )
        if student[lvl].stride != teacher[lvl].stride:
            raise ValueError(
                f"{option}: level {lvl!r} has stride {student[lvl].stride} in the student "
                f"but {teacher[lvl].stride} in the teacher"
            )


class FeatureImitation(nn.Module):
    """Adapters per level and the masked feature imitation loss (DESIGN §3).

    ``forward(student, teacher, masks)``: dicts level -> (N,C_s,H,W), (N,C_t,H',W')
    with H'>=H, W'>=W (the teacher is cropped top-left to the student's size), and
    level -> (N,H,W) masks. Returns the scalar loss.
    """

    def __init__(
        self,
        levels: Sequence[str],
        student_shapes: Mapping[str, ShapeSpec],
        teacher_shapes: Mapping[str, ShapeSpec],
        adapter: str,
        option: str,
    ):
        super().__init__()
        levels = list(levels) or [k for k in student_shapes if k in teacher_shapes]
        _check_levels(levels, student_shapes, teacher_shapes, option)
        self.levels = levels
        self.strides = {k: student_shapes[k].stride for k in levels}
        self.adapters = nn.ModuleDict(
            {k: build_adapter(adapter, student_shapes[k].channels, teacher_shapes[k].channels, k) for k in levels}
        )

    def forward(
        self,
        student: Mapping[str, torch.Tensor],
        teacher: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        s, t, m = [], [], []
        for k in self.levels:
            fs = student[k]
            s.append(self.adapters[k](fs))
            t.append(teacher[k][..., : fs.shape[-2], : fs.shape[-1]])
            m.append(masks[k])
        return feature_imitation_loss(s, t, m)


def build_feature_imitation(
    weight: float, levels: Sequence[str], student, teacher, adapter: str, option: str
) -> Optional[FeatureImitation]:
    """A FeatureImitation between the two backbones, or None when ``weight`` is 0
    (then no adapters exist: nothing unused for DDP, nothing computed)."""
    if weight <= 0:
        return None
    return FeatureImitation(
        levels, student.backbone.output_shape(), teacher.model.backbone.output_shape(), adapter, option
    )


def gaussian_masks(
    gt_instances: Sequence[Instances],
    shapes: Mapping[str, torch.Size],
    strides: Mapping[str, int],
    sigma_ratio: float,
) -> Dict[str, torch.Tensor]:
    """level -> (N,H,W): per image, the max over its GT boxes of the Gaussian of DESIGN §4.1.2."""
    out = {}
    for lvl, shape in shapes.items():
        h, w = shape[-2:]
        out[lvl] = torch.stack(
            [gaussian_mask(inst.gt_boxes.tensor, h, w, strides[lvl], sigma_ratio) for inst in gt_instances]
        )
    return out
