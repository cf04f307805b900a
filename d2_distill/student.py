"""The one place that knows how a distiller relates to its student.

A distiller config is the student's own detectron2 config with
``MODEL.META_ARCHITECTURE: "Distiller"`` and a ``DISTILL`` node; the student's
meta-architecture is ``DISTILL.STUDENT_META_ARCHITECTURE``. A distiller's state
dict holds the student under ``student.`` and the method's trainable parts
(adapters) under ``method.``; the teacher is never saved.

Everything that converts between the two views asks this module:

* :func:`student_cfg` -- the distiller config -> the config that builds the student;
* :func:`vanilla_student_cfg` -- the same, without the DISTILL node, for vanilla
  detectron2 (what ``python -m d2_distill.export`` writes);
* :func:`is_distiller_state` / :func:`student_state_dict` -- a distiller
  state dict -> the student's own state dict;
* :func:`student_inputs` -- one image -> the student's test-time input, as
  detectron2's ``DefaultPredictor`` prepares it;
* :func:`mismatch_report` / :func:`state_mismatch` -- what keeps a state dict
  from loading into a model exactly, in the words every loader's error uses.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode

__all__ = [
    "DISTILLER_ARCH",
    "STUDENT_PREFIX",
    "METHOD_PREFIX",
    "EXPORT_COMMAND",
    "is_distiller_cfg",
    "student_cfg",
    "vanilla_student_cfg",
    "is_distiller_state",
    "student_state_dict",
    "student_inputs",
    "mismatch_report",
    "state_mismatch",
]

DISTILLER_ARCH = "Distiller"
STUDENT_PREFIX = "student."
METHOD_PREFIX = "method."
# How a user turns a distiller checkpoint into a vanilla detectron2 one (named in errors).
EXPORT_COMMAND = "python -m d2_distill.export --config-file <distiller config> --weights <checkpoint> --output <dir>"


def is_distiller_cfg(cfg: CfgNode) -> bool:
    return cfg.MODEL.META_ARCHITECTURE == DISTILLER_ARCH and "DISTILL" in cfg


def _student_arch(cfg: CfgNode) -> str:
    arch = cfg.DISTILL.STUDENT_META_ARCHITECTURE
    if arch in ("", DISTILLER_ARCH):
        raise ValueError(
            f"DISTILL.STUDENT_META_ARCHITECTURE={arch!r}: name the student's own "
            "meta-architecture (e.g. 'GeneralizedRCNN', 'RetinaNet')"
        )
    return arch


def student_cfg(cfg: CfgNode) -> CfgNode:
    """The student's own config: the distiller config with MODEL.META_ARCHITECTURE =
    DISTILL.STUDENT_META_ARCHITECTURE (frozen). A non-distiller config is returned as is."""
    if not is_distiller_cfg(cfg):
        return cfg
    scfg = cfg.clone()
    scfg.defrost()
    scfg.MODEL.META_ARCHITECTURE = _student_arch(cfg)
    scfg.freeze()
    return scfg


def _unknown_keys(node: CfgNode, ref: CfgNode, prefix: str = "") -> List[str]:
    """Keys of ``node`` (recursively) that the reference config does not have."""
    unknown = []
    for key, value in node.items():
        name = prefix + key
        if key not in ref:
            unknown.append(name)
        elif isinstance(value, CfgNode) and isinstance(ref[key], CfgNode) and not ref[key].is_new_allowed():
            unknown.extend(_unknown_keys(value, ref[key], name + "."))
    return unknown


def vanilla_student_cfg(cfg: CfgNode, weights: str = "") -> CfgNode:
    """The student's config for vanilla detectron2: :func:`student_cfg` without the
    DISTILL node and with MODEL.WEIGHTS = ``weights`` (frozen).

    Raises ValueError for a config that is not a distiller's, or one with keys that
    vanilla ``get_cfg()`` does not know (the file would not load without extensions).
    """
    from detectron2.config import get_cfg

    if not is_distiller_cfg(cfg):
        raise ValueError(
            f"not a Distiller config: MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE!r} "
            "(expected 'Distiller' with a DISTILL node); a plain detectron2 config needs no export"
        )
    scfg = student_cfg(cfg).clone()
    scfg.defrost()
    scfg.MODEL.WEIGHTS = weights
    del scfg["DISTILL"]
    unknown = _unknown_keys(scfg, get_cfg())
    if unknown:
        raise ValueError(
            "the config has keys vanilla detectron2's get_cfg() does not know, so the exported "
            f"student config would not load without extensions: {', '.join(unknown)}"
        )
    scfg.freeze()
    return scfg


def is_distiller_state(state: Mapping[str, Any]) -> bool:
    """Whether a model state dict is a distiller's (it has ``student.*`` keys)."""
    return any(k.startswith(STUDENT_PREFIX) for k in state)


def student_state_dict(state: Mapping[str, Any]) -> Dict[str, Any]:
    """The student's own state dict: the ``student.*`` entries of a distiller state
    dict, prefix stripped; everything else (``method.*`` adapters) is dropped.
    Empty when ``state`` is not a distiller's."""
    n = len(STUDENT_PREFIX)
    return {k[n:]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}


def student_inputs(cfg: CfgNode, image: np.ndarray) -> Dict[str, Any]:
    """One model input from an HWC BGR uint8 image, prepared as detectron2's
    DefaultPredictor does: converted to the config's INPUT.FORMAT, shortest edge
    resized to INPUT.MIN_SIZE_TEST (at most INPUT.MAX_SIZE_TEST), CHW float32."""
    from detectron2.data import transforms as T

    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HWC BGR image, got shape {image.shape}")
    original = image[:, :, ::-1] if cfg.INPUT.FORMAT == "RGB" else image
    height, width = original.shape[:2]
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
    resized = aug.get_transform(original).apply_image(original)
    tensor = torch.as_tensor(np.ascontiguousarray(resized.astype("float32").transpose(2, 0, 1)))
    return {"image": tensor, "height": height, "width": width}


def mismatch_report(
    missing: Sequence[str], unexpected: Sequence[str], wrong_shapes: Sequence[Tuple[str, Any, Any]],
) -> str:
    """'' when all three are empty, else e.g. ``2 missing key(s): a, b; 1 wrong shape(s):
    c (checkpoint (3,), model (4,))``. ``wrong_shapes``: (key, checkpoint shape, model shape)."""
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {', '.join(sorted(missing))}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {', '.join(sorted(unexpected))}")
    if wrong_shapes:
        problems.append(f"{len(wrong_shapes)} wrong shape(s): " + ", ".join(
            f"{k} (checkpoint {tuple(a)}, model {tuple(b)})" for k, a, b in wrong_shapes))
    return "; ".join(problems)


def state_mismatch(model_state: Mapping[str, Any], state: Mapping[str, Any]) -> str:
    """:func:`mismatch_report` of loading ``state`` into a model whose state dict is
    ``model_state``, key for key ('' if it loads exactly)."""
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    shapes = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in model_state.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    return mismatch_report(missing, unexpected, shapes)
