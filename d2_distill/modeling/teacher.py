"""The frozen teacher.

Built from its own detectron2 config (DISTILL.TEACHER.CONFIG_FILE + OPTS), loaded
strictly from DISTILL.TEACHER.WEIGHTS, frozen, and kept in eval mode. It is held
by the distiller outside of its registered submodules, so it is never saved in a
checkpoint, never wrapped by DDP and never handed to the optimizer.

The teacher never runs its own ``forward``: methods call the parts they need
(backbone, RPN, box head, dense head) through the helpers here, all under
``torch.no_grad()``. Post-processing / NMS never runs.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Dict, Sequence

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model
from detectron2.structures import ImageList
from torch import nn

from ..config import add_distill_config

__all__ = ["FrozenTeacher", "build_teacher", "resolve_config_file", "load_teacher_cfg"]

logger = logging.getLogger(__name__)

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def resolve_config_file(name: str, what: str = "DISTILL.TEACHER.CONFIG_FILE") -> str:
    """A config path (absolute, cwd-relative or project-relative) or a model-zoo name."""
    if not name:
        raise ValueError(f"{what} is empty: name the teacher's detectron2 config (a file or a model-zoo name)")
    tried = []
    for cand in (name, os.path.join(PROJECT_ROOT, name)):
        tried.append(os.path.abspath(cand))
        if os.path.isfile(cand):
            return cand
    try:
        from detectron2 import model_zoo

        path = model_zoo.get_config_file(name)
        if os.path.isfile(path):
            return path
    except RuntimeError:
        pass
    tried.append(f"detectron2 model zoo entry {name!r}")
    raise FileNotFoundError(f"{what}={name!r} not found; tried: " + "; ".join(tried))


def load_teacher_cfg(cfg: CfgNode) -> CfgNode:
    """The teacher's own config, on the student's device."""
    tcfg = get_cfg()
    add_distill_config(tcfg)
    tcfg.merge_from_file(resolve_config_file(cfg.DISTILL.TEACHER.CONFIG_FILE))
    tcfg.merge_from_list(list(cfg.DISTILL.TEACHER.OPTS))
    if tcfg.MODEL.META_ARCHITECTURE == "Distiller":  # a distilled model can teach in turn
        tcfg.MODEL.META_ARCHITECTURE = tcfg.DISTILL.STUDENT_META_ARCHITECTURE
    tcfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    tcfg.MODEL.WEIGHTS = cfg.DISTILL.TEACHER.WEIGHTS
    tcfg.freeze()
    return tcfg


def _check_weights_path(weights: str) -> None:
    if not weights:
        raise ValueError(
            "DISTILL.TEACHER.WEIGHTS is empty: a teacher needs trained weights "
            "(a .pth/.pkl path or URL)"
        )
    if "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"DISTILL.TEACHER.WEIGHTS={weights!r}: no such file")


class StrictTeacherCheckpointer(DetectionCheckpointer):
    """Loads teacher weights strictly: a missing, unexpected or mis-shaped key is an
    error naming both files, never a warning. Reads .pth, model-zoo .pkl (with
    detectron2's name matching) and distiller checkpoints (their student)."""

    def _load_file(self, filename):
        try:
            loaded = super()._load_file(filename)
        except Exception as e:  # corrupt, truncated, not a checkpoint
            raise RuntimeError(
                f"DISTILL.TEACHER.WEIGHTS={filename!r} could not be read as a checkpoint: {e}"
            ) from e
        if not isinstance(loaded, dict) or "model" not in loaded:
            raise RuntimeError(f"DISTILL.TEACHER.WEIGHTS={filename!r} holds no 'model' state dict")
        return loaded

    def _load_model(self, checkpoint):
        state = checkpoint["model"]
        if any(k.startswith("student.") for k in state):  # a distiller checkpoint: take its student
            checkpoint["model"] = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
        incompatible = super()._load_model(checkpoint)
        problems = []
        if incompatible.missing_keys:
            problems.append(f"missing keys {sorted(incompatible.missing_keys)}")
        if incompatible.unexpected_keys:
            problems.append(f"unexpected keys {sorted(incompatible.unexpected_keys)}")
        if incompatible.incorrect_shapes:
            problems.append(
                "wrong shapes "
                + ", ".join(f"{k}: file {a} vs model {b}" for k, a, b in incompatible.incorrect_shapes)
            )
        if problems:
            raise RuntimeError(
                f"DISTILL.TEACHER.WEIGHTS={self._weights!r} does not match the teacher built from "
                f"DISTILL.TEACHER.CONFIG_FILE={self._config_file!r}: " + "; ".join(problems)
            )
        return incompatible

    def load_strict(self, weights: str, config_file: str) -> None:
        _check_weights_path(weights)
        self._weights, self._config_file = weights, config_file
        self.load(weights, checkpointables=[])


class FrozenTeacher(nn.Module):
    """A detectron2 model, frozen, in eval mode forever."""

    def __init__(self, model: nn.Module, cfg: CfgNode):
        super().__init__()
        self.model = model
        self.cfg = cfg
        for p in self.model.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)  # eval() forever: BN/GN statistics, dropout, RPN topk

    @property
    def input_format(self) -> str:
        return self.cfg.INPUT.FORMAT

    @torch.no_grad()
    def preprocess(
        self, batched_inputs: Sequence[Dict], student_format: str, size_divisibility: int
    ) -> ImageList:
        """Normalise the (same, already augmented) images with the teacher's own
        format/mean/std and pad to ``size_divisibility`` (a multiple of both
        models' divisibility, so feature maps align top-left)."""
        m = self.model
        images = [x["image"].to(m.pixel_mean.device) for x in batched_inputs]
        if student_format != self.input_format:
            if {student_format, self.input_format} != {"RGB", "BGR"}:
                raise ValueError(
                    f"teacher INPUT.FORMAT={self.input_format!r} and student INPUT.FORMAT={student_format!r}: "
                    "only RGB<->BGR conversion is supported"
                )
            images = [x.flip(0) for x in images]
        images = [(x - m.pixel_mean) / m.pixel_std for x in images]
        return ImageList.from_tensors(images, size_divisibility)

    @torch.no_grad()
    def backbone(self, images: ImageList) -> Dict[str, torch.Tensor]:
        return self.model.backbone(images.tensor)


def common_divisibility(*backbones: nn.Module) -> int:
    divs = [max(int(getattr(b, "size_divisibility", 0) or 0), 1) for b in backbones]
    return math.lcm(*divs)


def build_teacher(cfg: CfgNode) -> FrozenTeacher:
    """Build, strictly load and freeze the teacher named by ``cfg.DISTILL.TEACHER``."""
    tcfg = load_teacher_cfg(cfg)
    weights = cfg.DISTILL.TEACHER.WEIGHTS
    _check_weights_path(weights)  # fail before building anything
    model = build_model(tcfg)
    StrictTeacherCheckpointer(model).load_strict(weights, cfg.DISTILL.TEACHER.CONFIG_FILE)
    logger.info("Teacher %s loaded from %s", tcfg.MODEL.META_ARCHITECTURE, weights)
    return FrozenTeacher(model, tcfg)


def crop_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Crop a teacher map (N,C,H',W') to a student map's (H,W); H'>=H, W'>=W (top-left aligned)."""
    h, w = like.shape[-2:]
    if x.shape[-2] < h or x.shape[-1] < w:
        raise ValueError(f"teacher feature {tuple(x.shape)} is smaller than the student's {tuple(like.shape)}")
    return x[..., :h, :w]


def level_strides(backbone: nn.Module) -> Dict[str, int]:
    return {k: v.stride for k, v in backbone.output_shape().items()}


def level_channels(backbone: nn.Module) -> Dict[str, int]:
    return {k: v.channels for k, v in backbone.output_shape().items()}
