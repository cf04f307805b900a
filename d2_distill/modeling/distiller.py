"""The Distiller meta-architecture.

Design:
* ``self.student`` is an unmodified detectron2 model built by detectron2's own
  ``build_model`` from the student config (MODEL.META_ARCHITECTURE replaced by
  DISTILL.STUDENT_META_ARCHITECTURE). Its forward, losses and outputs are its own;
  the method only *observes* it through a Recorder (forward hooks).
* ``self.teacher`` is a FrozenTeacher held outside the registered submodules:
  it is not in ``state_dict()``, not in ``parameters()`` (so neither the optimizer
  nor DDP see it) and is rebuilt from DISTILL.TEACHER on every run.
* ``self.method`` is the distillation method (adapters included): saved with the
  distiller, never with the student, so the exported student is vanilla.
* Training: teacher backbone on the teacher's own normalisation of the same
  images (padded to a size divisible by both models) -> student forward with
  recording -> method losses, each multiplied by the schedule factor r(t), which
  is a function of the EventStorage iteration (so it survives ``--resume``) and
  is logged as ``distill/schedule_factor``.
* Eval: exactly ``self.student(batched_inputs)``.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from detectron2.config import CfgNode
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.utils.events import get_event_storage
from torch import nn

from ..config import validate_distill_cfg
from ..methods import DISTILL_METHOD_REGISTRY, DistillStep
from ..methods.functional import schedule_factor
from .capture import Recorder
from .teacher import FrozenTeacher, build_teacher, common_divisibility, load_teacher_cfg

__all__ = ["Distiller", "student_cfg"]


def student_cfg(cfg: CfgNode) -> CfgNode:
    """The student's own config: the distiller config with the student's meta-architecture."""
    scfg = cfg.clone()
    scfg.defrost()
    scfg.MODEL.META_ARCHITECTURE = cfg.DISTILL.STUDENT_META_ARCHITECTURE
    scfg.freeze()
    return scfg


@META_ARCH_REGISTRY.register()
class Distiller(nn.Module):
    def __init__(self, cfg: CfgNode):
        super().__init__()
        validate_distill_cfg(cfg)
        method_cls = DISTILL_METHOD_REGISTRY.get(cfg.DISTILL.METHOD)
        scfg = student_cfg(cfg)
        method_cls.check_configs(scfg, load_teacher_cfg(cfg))  # before loading any weights

        self.student = build_model(scfg)
        self.__dict__["teacher"] = build_teacher(cfg)  # deliberately unregistered
        self.method = method_cls(cfg, self.student, self.teacher)
        self.recorder = Recorder(self.student)
        self.method.install(self.recorder)

        s = cfg.DISTILL.SCHEDULE
        self.schedule_kind = s.KIND or method_cls.default_schedule
        self.warmup_iters = s.WARMUP_ITERS
        self.iters_per_epoch = s.ITERS_PER_EPOCH
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.input_format = cfg.INPUT.FORMAT
        self.size_divisibility = common_divisibility(self.student.backbone, self.teacher.model.backbone)

    teacher: FrozenTeacher

    @property
    def device(self) -> torch.device:
        return self.student.device

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda()/.half() also move the unregistered teacher
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn, *args, **kwargs)
        return self

    def schedule_factor(self, it: int) -> float:
        return schedule_factor(
            self.schedule_kind,
            it,
            self.max_iter,
            warmup_iters=self.warmup_iters,
            iters_per_epoch=self.iters_per_epoch,
        )

    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return self.student(batched_inputs)

        storage = get_event_storage()
        r = self.schedule_factor(storage.iter)
        storage.put_scalar("distill/schedule_factor", r, smoothing_hint=False)
        if not self.method.needs_teacher:
            return self.student(batched_inputs)

        t_images = self.teacher.preprocess(batched_inputs, self.input_format, self.size_divisibility)
        step = DistillStep(
            batched_inputs=batched_inputs,
            gt_instances=[x["instances"].to(self.device) for x in batched_inputs],
            student_losses={},
            records={},
            teacher_images=t_images,
            teacher_features=self.teacher.backbone(t_images),
        )
        self.method.before_student(step)
        with self.recorder.recording() as records:
            step.student_losses = self.student(batched_inputs)
            step.records = records
            distill_losses = self.method(step)

        losses = dict(step.student_losses)
        for name, value in distill_losses.items():
            losses[name] = value * r
        return losses
