"""The frozen teacher.

Built from its own detectron2 config (DISTILL.TEACHER.CONFIG_FILE + OPTS), loaded
strictly from DISTILL.TEACHER.WEIGHTS (refused if any tensor is NaN/Inf), frozen,
and kept in eval mode.

:class:`FrozenTeacher` is deliberately *not* an ``nn.Module``: assigning it to an
attribute of a module (the distiller, a method) does not register it, so the
teacher is never in ``state_dict()`` or ``parameters()``: never saved in a
checkpoint, never wrapped by DDP, never handed to the optimizer, never switched
to train mode by ``model.train()``. This is the one way the teacher is hidden.

The teacher never runs its own ``forward``: methods call the parts they need
(backbone, RPN, box head, dense head) through the helpers here, all under
``torch.no_grad()``. Post-processing / NMS never runs.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Callable, Dict, Iterator, Optional, Sequence

import numpy as np
import yaml

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model
from detectron2.structures import ImageList
from torch import nn

from ..config import add_distill_config
from ..student import is_distiller_state, mismatch_report, student_cfg, student_state_dict

__all__ = [
    "FrozenTeacher",
    "build_teacher",
    "check_teacher_weights",
    "common_divisibility",
    "load_teacher_cfg",
    "resolve_config_file",
    "teacher_config_beside",
]

logger = logging.getLogger(__name__)

def resolve_config_file(name: str, what: str = "DISTILL.TEACHER.CONFIG_FILE") -> str:
    """A config path (absolute or relative to the working directory) or a model-zoo
    name. (A path relative to the config file that names it has been made usable by
    :func:`teacher_config_beside`, which ``setup_cfg`` applies.)"""
    if not name:
        raise ValueError(f"{what} is empty: name the teacher's detectron2 config (a file or a model-zoo name)")
    tried = [os.path.abspath(name)]
    if os.path.isfile(name):
        return name
    try:
        from detectron2 import model_zoo

        path = model_zoo.get_config_file(name)
        if os.path.isfile(path):
            return path
    except RuntimeError:
        pass
    tried.append(f"detectron2 model zoo entry {name!r}")
    raise FileNotFoundError(f"{what}={name!r} not found; tried: " + "; ".join(tried))


class _KeysLoader(yaml.SafeLoader):
    """safe_load that reads a value written with a Python tag (which fvcore would
    evaluate, e.g. the model zoo's anchor sizes) as None instead of failing: only
    the config's keys matter here, and nothing is evaluated."""


_KeysLoader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)


def _naming_file(config_file: str, keys: Sequence[str]) -> Optional[str]:
    """The file of ``config_file``'s ``_BASE_`` chain whose value of ``keys`` wins
    (the including file over its bases, a later base over an earlier one)."""
    with open(config_file) as f:
        data = yaml.load(f, Loader=_KeysLoader) or {}
    node = data
    for k in keys:
        node = node.get(k) if isinstance(node, dict) else None
    if node is not None:
        return config_file
    bases = data.get("_BASE_") or []
    for base in reversed(bases if isinstance(bases, list) else [bases]):
        if base.startswith("~"):
            base = os.path.expanduser(base)
        if not os.path.isabs(base) and "://" not in base:
            base = os.path.join(os.path.dirname(config_file), base)
        if os.path.isfile(base):
            found = _naming_file(base, keys)
            if found is not None:
                return found
    return None


def teacher_config_beside(config_file: str, name: str) -> str:
    """DISTILL.TEACHER.CONFIG_FILE as a config file names it: like ``_BASE_``, a
    relative path is first looked up beside the file that names it (the config
    itself or one of its bases). Returns that path (relative to the working
    directory when it lies below it), or ``name`` unchanged when there is no such
    file (then the working directory and the model zoo are tried when the teacher
    is built, see :func:`resolve_config_file`)."""
    if not name or os.path.isabs(name):
        return name
    origin = _naming_file(config_file, ("DISTILL", "TEACHER", "CONFIG_FILE"))
    if origin is None:
        return name
    beside = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(origin)), name))
    if not os.path.isfile(beside):
        return name
    rel = os.path.relpath(beside)
    return beside if rel.startswith("..") else rel


def load_teacher_cfg(cfg: CfgNode) -> CfgNode:
    """The teacher's own config, on the student's device."""
    tcfg = get_cfg()
    add_distill_config(tcfg)
    tcfg.merge_from_file(resolve_config_file(cfg.DISTILL.TEACHER.CONFIG_FILE))
    tcfg.merge_from_list(list(cfg.DISTILL.TEACHER.OPTS))
    tcfg = student_cfg(tcfg).clone()  # a distilled model can teach in turn: its student does
    tcfg.defrost()
    tcfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    tcfg.MODEL.WEIGHTS = cfg.DISTILL.TEACHER.WEIGHTS
    tcfg.freeze()
    return tcfg


def check_teacher_weights(weights: str) -> None:
    """Fail at once when DISTILL.TEACHER.WEIGHTS is empty or names a missing file."""
    if not weights:
        raise ValueError(
            "DISTILL.TEACHER.WEIGHTS is empty: a teacher needs trained weights "
            "(a .pth/.pkl path or URL)"
        )
    if "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"DISTILL.TEACHER.WEIGHTS={weights!r}: no such file")


def _first_non_finite(state: Dict[str, object]):
    """(key, number of non-finite values) of the first floating tensor with NaN/Inf, or None."""
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
                return key, int((~np.isfinite(value)).sum())
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                return key, int((~finite).sum())
    return None


class StrictTeacherCheckpointer(DetectionCheckpointer):
    """Loads teacher weights strictly: a missing, unexpected or mis-shaped key, or a
    tensor with NaN/Inf values, is an error naming the file, never a warning. Reads
    .pth, model-zoo .pkl (with detectron2's name matching) and distiller checkpoints
    (their student)."""

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
        if is_distiller_state(state):  # a distiller checkpoint: take its student
            state = checkpoint["model"] = student_state_dict(state)
        bad = _first_non_finite(state)
        if bad is not None:
            raise RuntimeError(
                f"DISTILL.TEACHER.WEIGHTS={self._weights!r} has non-finite values: tensor {bad[0]!r} holds "
                f"{bad[1]} NaN/Inf value(s); a teacher must be a finite, trained checkpoint "
                "(was its training diverging when it was saved?)"
            )
        incompatible = super()._load_model(checkpoint)
        problem = mismatch_report(incompatible.missing_keys, incompatible.unexpected_keys,
                                  incompatible.incorrect_shapes)
        if problem:
            raise RuntimeError(
                f"DISTILL.TEACHER.WEIGHTS={self._weights!r} does not match the teacher built from "
                f"DISTILL.TEACHER.CONFIG_FILE={self._config_file!r}: {problem}"
            )
        return incompatible

    def load_strict(self, weights: str, config_file: str) -> None:
        check_teacher_weights(weights)
        self._weights, self._config_file = weights, config_file
        self.load(weights, checkpointables=[])


class FrozenTeacher:
    """A detectron2 model, frozen (no parameter requires grad) and in eval mode.

    Not an ``nn.Module`` (see the module docstring): holders move it with
    :meth:`to` / :meth:`apply_to_model`, nothing else reaches it.
    """

    def __init__(self, model: nn.Module, cfg: CfgNode):
        self.model = model
        self.cfg = cfg
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

    @property
    def training(self) -> bool:
        return self.model.training

    @property
    def input_format(self) -> str:
        return self.cfg.INPUT.FORMAT

    @property
    def device(self) -> torch.device:
        return self.model.pixel_mean.device

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    def modules(self) -> Iterator[nn.Module]:
        return self.model.modules()

    def to(self, *args, **kwargs) -> "FrozenTeacher":
        self.model.to(*args, **kwargs)
        return self

    def apply_to_model(self, fn: Callable) -> None:
        """What ``nn.Module._apply`` does to its own tensors (``.to()``, ``.half()``, ...)."""
        self.model._apply(fn)

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
    check_teacher_weights(weights)  # fail before building anything
    model = build_model(tcfg)
    StrictTeacherCheckpointer(model).load_strict(weights, cfg.DISTILL.TEACHER.CONFIG_FILE)
    logger.info("Teacher %s loaded from %s", tcfg.MODEL.META_ARCHITECTURE, weights)
    return FrozenTeacher(model, tcfg)
