"""The Distiller meta-architecture.

* ``self.student`` is an unmodified detectron2 model built by detectron2's own
  ``build_model`` from the student config (:func:`d2_distill.student.student_cfg`).
  Its forward, losses and outputs are its own; the method only *observes* it
  through a Recorder (forward hooks).
* ``self.teacher`` is a :class:`FrozenTeacher`, which is not an ``nn.Module``: it
  is not in ``state_dict()`` or ``parameters()`` (neither the optimizer nor DDP
  see it) and is rebuilt from DISTILL.TEACHER on every run.
* ``self.method`` is the distillation method (adapters included): saved with the
  distiller, never with the student, so the exported student is vanilla.

Evaluation needs no teacher. ``build_model(cfg)`` (what DefaultPredictor,
``train_net.py --eval-only`` and ``DistillTrainer.build_model`` call) builds the
student only: ``teacher`` and ``method`` are None, the teacher's files are never
read, and loading a distiller checkpoint ignores its ``method.*`` tensors (the
adapters are training state). Training attaches the teacher and the method:
:func:`attach_teacher` (what DistillTrainer does), or
``Distiller(cfg, with_teacher=True)``, or ``Distiller(student=..., teacher=...,
method=..., schedule=...)`` without a config.

Training step: teacher backbone on the teacher's own normalisation of the same
images (padded to a size divisible by both models) -> student forward with
recording -> method losses, each multiplied by the schedule factor r(t), a
function of the EventStorage iteration (so it survives ``--resume``), logged as
``distill/schedule_factor``. Eval: exactly ``self.student(batched_inputs)``.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import torch
from detectron2.config import CfgNode, configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.utils.events import get_event_storage
from torch import nn

from ..config import validate_distill_cfg
from ..losses import DistillSchedule
from ..methods import DistillMethod, DistillStep, method_class
from ..student import METHOD_PREFIX, student_cfg
from .capture import Recorder
from .diagnostics import gradient_ratios, student_parts
from .teacher import FrozenTeacher, build_teacher, check_teacher_weights, common_divisibility, load_teacher_cfg

__all__ = ["Distiller", "attach_teacher", "build_schedule"]

logger = logging.getLogger(__name__)

NO_TEACHER = (
    "this Distiller has no teacher: build_model(cfg) builds the student only (for evaluation "
    "and export). To train, attach the teacher and the method first: "
    "d2_distill.modeling.attach_teacher(model, cfg) (DistillTrainer does this), or build with "
    "Distiller(cfg, with_teacher=True)"
)


def build_schedule(cfg: CfgNode) -> DistillSchedule:
    """The DISTILL.SCHEDULE of a distiller config (KIND "" = the method's default)."""
    s = cfg.DISTILL.SCHEDULE
    return DistillSchedule(
        kind=s.KIND or method_class(cfg.DISTILL.METHOD).default_schedule,
        max_iter=cfg.SOLVER.MAX_ITER,
        warmup_iters=s.WARMUP_ITERS,
        iters_per_epoch=s.ITERS_PER_EPOCH,
    )


def _teacher_and_method(cfg: CfgNode, student: nn.Module):
    """Check the pair from the configs, then build and strictly load the teacher and
    build the method. Fails before reading any weights when the configs cannot work."""
    method_cls = method_class(cfg.DISTILL.METHOD)
    method_cls.check_configs(student_cfg(cfg), load_teacher_cfg(cfg))
    check_teacher_weights(cfg.DISTILL.TEACHER.WEIGHTS)
    teacher = build_teacher(cfg)
    return teacher, method_cls(cfg, student=student, teacher=teacher)


@META_ARCH_REGISTRY.register()
class Distiller(nn.Module):
    @configurable
    def __init__(
        self,
        *,
        student: nn.Module,
        teacher: Optional[FrozenTeacher] = None,
        method: Optional[DistillMethod] = None,
        schedule: Optional[DistillSchedule] = None,
        input_format: str = "BGR",
        grad_period: int = 0,
        log_period: int = 20,
    ):
        """
        Args:
            student: a detectron2 model (GeneralizedRCNN, RetinaNet, ...).
            teacher, method: the frozen teacher and the method built for this pair;
                both or neither (then the distiller evaluates only; see :meth:`attach`).
            schedule: r(t) multiplying every distillation loss; None = constant 1.
            input_format: the student's INPUT.FORMAT (the teacher converts RGB<->BGR).
            grad_period: every this many iterations, log the distillation losses'
                gradient ratios (:mod:`d2_distill.modeling.diagnostics`); 0 = never.
            log_period: how often the method logs its own scalars (gate rates, ...).
        """
        super().__init__()
        self.student = student
        self.teacher: Optional[FrozenTeacher] = None
        self.method: Optional[DistillMethod] = None
        self.recorder: Optional[Recorder] = None
        self.schedule = schedule
        self.input_format = input_format
        self.grad_period = int(grad_period)
        self.log_period = int(log_period)
        self.size_divisibility = 1
        self.register_load_state_dict_pre_hook(_plain_student_state_into_student)
        self.register_load_state_dict_post_hook(_ignore_method_state_without_method)
        if teacher is not None or method is not None:
            self.attach(teacher, method)

    @classmethod
    def from_config(cls, cfg: CfgNode, with_teacher: bool = False) -> Dict[str, Any]:
        """The student from the config; with ``with_teacher`` also the teacher (strictly
        loaded from DISTILL.TEACHER.WEIGHTS) and the method."""
        validate_distill_cfg(cfg)
        student = build_model(student_cfg(cfg))
        ret = {"student": student, "schedule": build_schedule(cfg), "input_format": cfg.INPUT.FORMAT,
               "grad_period": cfg.DISTILL.DIAGNOSTICS.GRAD_PERIOD, "log_period": cfg.DISTILL.LOG_PERIOD}
        if with_teacher:
            ret["teacher"], ret["method"] = _teacher_and_method(cfg, student)
        return ret

    def attach(self, teacher: FrozenTeacher, method: DistillMethod) -> "Distiller":
        """Give a student-only distiller its teacher and method (for training)."""
        if teacher is None or method is None:
            raise ValueError("Distiller: teacher and method come together (give both or neither)")
        if self.method is not None:
            raise RuntimeError("this Distiller already has a teacher and a method")
        self.teacher = teacher.to(self.device)
        self.method = method.to(self.device)
        self.method.log_period = self.log_period
        self.recorder = Recorder(self.student)
        self.method.install(self.recorder)
        self.size_divisibility = common_divisibility(self.student.backbone, teacher.model.backbone)
        return self

    @property
    def device(self) -> torch.device:
        return self.student.device

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda()/.half() also move the teacher, which is not a submodule
        super()._apply(fn, *args, **kwargs)
        if self.teacher is not None:
            self.teacher.apply_to_model(fn)
        return self

    def schedule_factor(self, it: int) -> float:
        return 1.0 if self.schedule is None else self.schedule(it)

    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return self.student(batched_inputs)
        if self.method is None:
            raise RuntimeError(NO_TEACHER)

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
        if self.grad_period > 0 and storage.iter % self.grad_period == 0:
            self._log_gradient_ratios(storage, step.student_losses, {k: losses[k] for k in distill_losses})
        return losses

    def _log_gradient_ratios(self, storage, student_losses, distill_losses) -> None:
        detection = sum(v for v in student_losses.values() if v.requires_grad)
        if not isinstance(detection, torch.Tensor):
            return
        ratios = gradient_ratios(detection, distill_losses, student_parts(self.student))
        for key, value in ratios.items():
            storage.put_scalar(f"distill/grad_ratio/{key}", value, smoothing_hint=False)


def _plain_student_state_into_student(
    module: Distiller, state_dict, prefix: str, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
) -> None:
    """A plain detectron2 checkpoint of the student's model (what ``d2_distill.export``
    writes: keys without ``student.``) loads into the distiller's student, so that
    DefaultPredictor given a distiller config and an exported student evaluates that
    student instead of a random one. A distiller checkpoint (any ``student.*`` or
    ``method.*`` key) is left as it is. Keys that the student does not have stay
    unexpected, and tensors of another shape fail in ``load_state_dict``."""
    own = [k for k in state_dict if k.startswith(prefix)]
    inner = prefix + "student."
    if not own or any(k.startswith(inner) or k.startswith(prefix + METHOD_PREFIX) for k in own):
        return
    student_keys = set(module.student.state_dict())
    plain = [k for k in own if k[len(prefix):] in student_keys]
    for k in plain:
        state_dict[inner + k[len(prefix):]] = state_dict.pop(k)
    if plain:
        logger.info("Checkpoint is a plain %s: loading it into the distiller's student (%d tensors)",
                    type(module.student).__name__, len(plain))


def _ignore_method_state_without_method(module: Distiller, incompatible) -> None:
    """A student-only distiller loading a distiller checkpoint: its ``method.*``
    tensors (adapters, training state) have nowhere to go and are not an error."""
    if module.method is not None:
        return
    ignored = [k for k in incompatible.unexpected_keys if k.startswith(METHOD_PREFIX)]
    if ignored:
        for k in ignored:
            incompatible.unexpected_keys.remove(k)
        logger.info(
            "Loaded the student; ignored %d %s* tensor(s) of the distillation method "
            "(training state: this distiller has no teacher attached)", len(ignored), METHOD_PREFIX,
        )


def attach_teacher(model: nn.Module, cfg: CfgNode) -> nn.Module:
    """For training: give a student-only Distiller built by ``build_model(cfg)`` its
    teacher (built from DISTILL.TEACHER and strictly loaded) and its method. Any
    other model (a plain detectron2 model, a Distiller that has its teacher) is
    returned unchanged. Fails at once when the teacher weights are missing, do not
    match DISTILL.TEACHER.CONFIG_FILE, hold NaN/Inf, or the pair cannot be served."""
    if not isinstance(model, Distiller) or model.method is not None:
        return model
    return model.attach(*_teacher_and_method(cfg, model.student))
