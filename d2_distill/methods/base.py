"""What a distillation method is, and the pieces methods share.

A method is a small ``nn.Module``, registered with
``@DISTILL_METHOD_REGISTRY.register()``, that declares on its class:

* ``name``: its ``DISTILL.METHOD`` value, which is also the name of its config
  node ``DISTILL.<name>``;
* ``loss_names``: the loss keys its ``forward`` can return (all ``loss_*``);
* ``components``: human label -> the config key of that component's weight
  (ablations switch a component off by setting its weight to 0);
* ``student_architectures``: the meta-architectures it serves;
* ``default_schedule``: the schedule used when DISTILL.SCHEDULE.KIND is "";
* ``add_config(cfg)``: adds ``DISTILL.<name>`` with its commented defaults;
* ``choices`` / ``non_negative`` / ``positive`` / ``unit_interval``: which of its
  options are checked how (:meth:`DistillMethod.check_options`);
* ``check_configs(student_cfg, teacher_cfg)``: whether it can serve a pair,
  from the two configs alone (runs before any weights are loaded).

The teacher's backbone runs in the distiller, for every method. Whatever else a
method runs on the teacher (heads on shared RoIs, dense heads, proposals) it
declares in one place, :meth:`DistillMethod.teacher_heads`, and its training
step runs exactly that: it is the part of a distillation step's floor that the
method needs (``benchmarks.step_cost`` measures it as phase h).

Its options are keyword arguments (``@configurable``): the lower-case names of
its config keys, so ``TARMethod(student=..., teacher=..., feat_weight=1.0)`` and
``TARMethod(cfg, student=..., teacher=...)`` build the same method. It records
what it needs on the student (``install``, through a
:class:`~d2_distill.modeling.capture.Recorder`), owns its trainable adapters (so
they are saved with the distiller, never with the student) and computes its
losses from a :class:`DistillStep` (``forward``), each multiplied by its own
weight; the distiller multiplies them by the schedule factor r(t).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.structures import ImageList, Instances
from detectron2.utils.events import get_event_storage
from detectron2.utils.registry import Registry
from torch import nn

from ..config import ADAPTERS
from ..losses import feature_imitation_loss
from ..losses import gaussian_masks as gaussian_masks_batch

__all__ = [
    "DISTILL_METHOD_REGISTRY",
    "method_class",
    "method_names",
    "DistillMethod",
    "DistillStep",
    "FeatureAdapters",
    "FeatureLevelsMethod",
    "build_adapter",
    "gaussian_masks",
    "check_same",
]

DISTILL_METHOD_REGISTRY = Registry("DISTILL_METHOD")
DISTILL_METHOD_REGISTRY.__doc__ = """Distillation methods (DistillMethod subclasses); each one's
``name`` class attribute is its DISTILL.METHOD value."""


def method_names() -> List[str]:
    """The DISTILL.METHOD values of every registered method, sorted."""
    return sorted(cls.name for _, cls in DISTILL_METHOD_REGISTRY)


def method_class(name: str) -> type:
    """The registered method whose ``name`` is ``name`` (a DISTILL.METHOD value)."""
    for _, cls in DISTILL_METHOD_REGISTRY:
        if cls.name == name:
            return cls
    raise ValueError(f"DISTILL.METHOD={name!r} is not one of {method_names()}")


@dataclass
class DistillStep:
    """Everything a method may use in one training step."""

    batched_inputs: Sequence[Dict[str, Any]]
    gt_instances: List[Instances]  # on the model's device, in input-image pixels
    student_losses: Dict[str, torch.Tensor]
    records: Dict[str, Any]  # what the method's hooks recorded on the student
    teacher_images: ImageList
    teacher_features: Dict[str, torch.Tensor]  # detached, padded like the teacher's images


class DistillMethod(nn.Module):
    """Base class of the methods in ``DISTILL_METHOD_REGISTRY``."""

    name: ClassVar[str] = ""
    loss_names: ClassVar[Tuple[str, ...]] = ()
    components: ClassVar[Dict[str, str]] = {}
    student_architectures: ClassVar[Tuple[str, ...]] = ()
    default_schedule: ClassVar[str] = "linear"
    # option checks, by lower-case option name (see check_options)
    choices: ClassVar[Dict[str, Tuple]] = {}
    non_negative: ClassVar[Tuple[str, ...]] = ()
    positive: ClassVar[Tuple[str, ...]] = ()
    unit_interval: ClassVar[Tuple[str, ...]] = ()

    # how often the method's own scalars (gate rates, ...) go to EventStorage;
    # the Distiller sets it from DISTILL.LOG_PERIOD
    log_period: int = 20

    def __init__(self, *, teacher):
        super().__init__()
        self.teacher = teacher  # a FrozenTeacher: not an nn.Module, so not registered here

    def put_scalar(self, name: str, value) -> None:
        """Log ``distill/<name>`` every ``log_period`` iterations; nothing otherwise.
        ``value``: a number, a tensor, or a function returning one (then only
        evaluated on the iterations that log)."""
        storage = get_event_storage()
        if self.log_period > 0 and storage.iter % self.log_period == 0:
            value = value() if callable(value) else value
            storage.put_scalar(f"distill/{name}", value.detach() if isinstance(value, torch.Tensor) else value)

    # ---- configuration ------------------------------------------------------
    @classmethod
    def add_config(cls, cfg: CfgNode) -> None:
        """Add ``DISTILL.<name>`` with the method's options and their defaults."""
        raise NotImplementedError

    @classmethod
    def options_from_config(cls, cfg: CfgNode) -> Dict[str, Any]:
        """The method's keyword options from ``DISTILL.<name>``: lower-cased keys."""
        return {k.lower(): v for k, v in cfg.DISTILL[cls.name].items()}

    @classmethod
    def from_config(cls, cfg: CfgNode, *, student: nn.Module, teacher) -> Dict[str, Any]:
        return {"student": student, "teacher": teacher, "adapter": cfg.DISTILL.ADAPTER,
                **cls.options_from_config(cfg)}

    @classmethod
    def check_options(cls, **options) -> None:
        """Raise ValueError naming the bad value (as its config key) and what would be
        valid. Options without a declared check, and names that are not options
        (``self``, ``student``, ...), are ignored, so ``__init__`` passes ``**locals()``."""
        for opt, value in options.items():
            key = f"DISTILL.{cls.name}.{opt.upper()}"
            if opt in cls.choices and value not in cls.choices[opt]:
                raise ValueError(f"{key}={value!r} is not one of {list(cls.choices[opt])}")
            if opt in cls.non_negative and not value >= 0:
                raise ValueError(f"{key}={value!r} must be >= 0")
            if opt in cls.positive and not value > 0:
                raise ValueError(f"{key}={value!r} must be > 0")
            if opt in cls.unit_interval and not 0.0 <= value <= 1.0:
                raise ValueError(f"{key}={value!r} must be in [0, 1]")

    @classmethod
    def validate_config(cls, cfg: CfgNode) -> None:
        """Check the method's options from the config alone (before anything is built)."""
        cls.check_options(**cls.options_from_config(cfg))

    @classmethod
    def check_configs(cls, student_cfg: CfgNode, teacher_cfg: CfgNode) -> None:
        """Raise ValueError naming what differs if the pair cannot be served.
        The base class checks both meta-architectures against ``student_architectures``."""
        for who, c in (("student", student_cfg), ("teacher", teacher_cfg)):
            arch = c.MODEL.META_ARCHITECTURE
            if arch not in cls.student_architectures:
                others = [m for m in method_names() if arch in method_class(m).student_architectures]
                raise ValueError(
                    f"DISTILL.METHOD={cls.name} serves {' and '.join(cls.student_architectures)} "
                    f"detectors; the {who} is {arch!r}"
                    + (f" (methods for {arch}: {', '.join(others)})" if others else "")
                )

    # ---- training -----------------------------------------------------------
    def install(self, recorder) -> None:
        """Attach the recorders the method needs to the student."""

    def before_student(self, step: DistillStep) -> None:
        """Runs after the teacher's backbone and before the student's forward."""

    def teacher_heads(self, step: DistillStep) -> Dict[str, Any]:
        """All the teacher work beyond its backbone that the method's training step
        runs (without grad), from a step whose student forward has run (its
        ``records``): the same calls, once, that ``before_student`` and ``forward``
        make. The default: none (feature methods use the backbone only)."""
        return {}

    @property
    def needs_teacher(self) -> bool:
        return True

    def forward(self, step: DistillStep) -> Dict[str, torch.Tensor]:
        raise NotImplementedError


class FeatureLevelsMethod(DistillMethod):
    """Base of the methods that imitate the teacher's backbone levels through
    adapters, for any FPN pair: options ``weight`` and ``levels``
    (DISTILL.<name>.WEIGHT / LEVELS, empty = every shared level). Weight 0 switches
    the method off: no adapters, and the teacher never runs."""

    student_architectures = ("GeneralizedRCNN", "RetinaNet")
    non_negative = ("weight",)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "components" not in cls.__dict__:  # one component: the imitation, weighted by WEIGHT
            cls.components = {"feature": f"DISTILL.{cls.name}.WEIGHT"}

    @classmethod
    def add_config(cls, cfg: CfgNode) -> CfgNode:
        """Adds DISTILL.<name> with WEIGHT and LEVELS; returns the node, for subclasses
        to add their own options."""
        c = cfg.DISTILL[cls.name] = CfgNode()
        # Weight of the method's loss; 0 switches the method off (the teacher never runs).
        c.WEIGHT = 1.0
        # Feature levels to imitate; empty = every level the student and teacher share.
        c.LEVELS = []
        return c

    def __init__(self, *, student, teacher, weight: float, levels: Sequence[str], adapter: str):
        super().__init__(teacher=teacher)
        self.weight = weight
        self.features = (
            FeatureAdapters(student, teacher, levels, adapter, f"DISTILL.{self.name}.LEVELS") if weight > 0 else None
        )

    @property
    def needs_teacher(self) -> bool:
        return self.features is not None

    def install(self, recorder) -> None:
        if self.features is not None:
            recorder.record_output("features", "backbone")


def check_same(what: str, student_value, teacher_value, method: str) -> None:
    if student_value != teacher_value:
        raise ValueError(
            f"DISTILL.METHOD={method} needs the same {what} in teacher and student: "
            f"student has {student_value!r}, teacher has {teacher_value!r}"
        )



class PointwiseConv(nn.Conv2d):
    """A 1x1 convolution computed as one batched matrix product per map: the same
    parameters (and checkpoint keys) as ``nn.Conv2d(kernel_size=1)``, the same
    result up to float rounding, and a cheaper backward on CPU, where a 1x1
    convolution on small maps takes a slow generic path."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        weight = self.weight.view(1, self.out_channels, c).to(x.dtype).expand(n, -1, -1)
        bias = self.bias.view(1, self.out_channels, 1).to(x.dtype)
        return torch.baddbmm(bias, weight, x.reshape(n, c, h * w)).view(n, self.out_channels, h, w)


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
    if kind not in ADAPTERS:
        raise ValueError(f"DISTILL.ADAPTER={kind!r} is not one of {list(ADAPTERS)}")
    if kind == "conv1x1":
        conv = PointwiseConv(in_channels, out_channels)
    else:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
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


class FeatureAdapters(nn.Module):
    """One adapter per distilled level (student channels -> teacher channels).

    ``levels`` empty means every level both backbones output. :meth:`pairs` gives the
    adapted student maps and the teacher maps cropped top-left to the student's size
    (the teacher's input may be padded more); :meth:`imitation_loss` is the masked
    feature imitation loss on them.
    """

    def __init__(self, student: nn.Module, teacher, levels: Sequence[str], adapter: str, option: str):
        super().__init__()
        s_shapes = student.backbone.output_shape()
        t_shapes = teacher.model.backbone.output_shape()
        levels = list(levels) or [k for k in s_shapes if k in t_shapes]
        _check_levels(levels, s_shapes, t_shapes, option)
        self.levels = levels
        self.strides = {k: s_shapes[k].stride for k in levels}
        self.adapters = nn.ModuleDict(
            {k: build_adapter(adapter, s_shapes[k].channels, t_shapes[k].channels, k) for k in levels}
        )

    def pairs(
        self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor]
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        s, t = [], []
        for k in self.levels:
            fs = student[k]
            s.append(self.adapters[k](fs))
            t.append(teacher[k][..., : fs.shape[-2], : fs.shape[-1]])
        return s, t

    def imitation_loss(
        self,
        student: Mapping[str, torch.Tensor],
        teacher: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor],
        standardize: bool = False,
    ) -> torch.Tensor:
        s, t = self.pairs(student, teacher)
        return feature_imitation_loss(s, t, [masks[k] for k in self.levels], standardize=standardize)

    def gaussian_masks(
        self, gt_instances: Sequence[Instances], student: Mapping[str, torch.Tensor], sigma_ratio: float,
        weights: Optional[Sequence[torch.Tensor]] = None,
    ) -> Dict[str, torch.Tensor]:
        """Gaussian GT masks on the student's maps of the distilled levels; ``weights``:
        per image, a (K,) weight of each object's Gaussian (a per-object gate)."""
        shapes = {k: student[k].shape for k in self.levels}
        return gaussian_masks(gt_instances, shapes, self.strides, sigma_ratio, weights)


def gaussian_masks(
    gt_instances: Sequence[Instances],
    shapes: Mapping[str, torch.Size],
    strides: Mapping[str, int],
    sigma_ratio: float,
    weights: Optional[Sequence[torch.Tensor]] = None,
) -> Dict[str, torch.Tensor]:
    """level -> (N,H,W): per image, the max over its GT boxes of a Gaussian around
    each box (sigma = sigma_ratio * box side, see :func:`d2_distill.losses.gaussian_mask`),
    each multiplied by its weight when ``weights`` (per image, (K,)) are given."""
    boxes = [inst.gt_boxes.tensor for inst in gt_instances]
    return {lvl: gaussian_masks_batch(boxes, shape[-2], shape[-1], strides[lvl], sigma_ratio, weights=weights)
            for lvl, shape in shapes.items()}
