"""Checkpointing for the distiller.

A distiller's state is ``student.*`` (the unmodified detectron2 student) plus
``method.*`` (adapters). The teacher is not a registered submodule, so it is never
saved; it is rebuilt from DISTILL.TEACHER every time.

``DistillCheckpointer`` loads two kinds of files into a Distiller:
* a distiller checkpoint (keys start with ``student.``): loaded as is (``--resume``);
* anything else (a plain detectron2 ``.pth``, a model-zoo ``.pkl``): it
  initialises the *student* exactly as vanilla detectron2 would, through a
  DetectionCheckpointer of the student (name-matching heuristics included).
For a model that is not a Distiller it behaves like DetectionCheckpointer.
"""
from __future__ import annotations

from typing import Any, Dict

from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["DistillCheckpointer", "is_distiller_state"]

STUDENT_PREFIX = "student."


def is_distiller_state(state: Dict[str, Any]) -> bool:
    return any(k.startswith(STUDENT_PREFIX) for k in state)


class DistillCheckpointer(DetectionCheckpointer):
    def _load_model(self, checkpoint: Dict[str, Any]):
        student = getattr(self.model, "student", None)
        if student is None or is_distiller_state(checkpoint["model"]):
            return super()._load_model(checkpoint)
        self.logger.info("Checkpoint is a plain detectron2 model: it initialises the student.")
        return DetectionCheckpointer(student)._load_model(checkpoint)
