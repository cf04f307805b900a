"""Checkpointing for the distiller.

A distiller's state is ``student.*`` (the unmodified detectron2 student) plus
``method.*`` (adapters); the teacher is never saved (see d2_distill.student).

``DistillCheckpointer`` is detectron2's DetectionCheckpointer, plus:

* into a Distiller, a plain detectron2 checkpoint (a ``.pth`` or a model-zoo
  ``.pkl``) initialises the *student*, exactly as vanilla detectron2 would
  (through a DetectionCheckpointer of the student: name matching included); a
  distiller checkpoint loads as is (``--resume``; a student-only distiller keeps
  the student and ignores ``method.*``);
* into a plain detectron2 model, a distiller checkpoint loads its student when
  the student matches the model key for key, and otherwise fails with an error
  that names the export command; it never silently loads nothing.
"""
from __future__ import annotations

from typing import Any, Dict

from detectron2.checkpoint import DetectionCheckpointer

from ..student import EXPORT_COMMAND, is_distiller_state, student_state_dict

__all__ = ["DistillCheckpointer"]


def _mismatch(model_state: Dict[str, Any], state: Dict[str, Any]) -> str:
    """What keeps ``state`` from loading into a model with ``model_state`` exactly ('' if nothing)."""
    problems = []
    missing = sorted(set(model_state) - set(state))
    unexpected = sorted(set(state) - set(model_state))
    shapes = [k for k, v in model_state.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shapes for", shapes)):
        if keys:
            problems.append(f"{len(keys)} {what} key(s) (e.g. {', '.join(keys[:3])})")
    return "; ".join(problems)


class DistillCheckpointer(DetectionCheckpointer):
    _loading = None  # the file being loaded, named in errors

    def _load_model(self, checkpoint: Dict[str, Any]):
        state = checkpoint["model"]
        student = getattr(self.model, "student", None)
        if student is not None:
            if is_distiller_state(state):
                return super()._load_model(checkpoint)
            self.logger.info("Checkpoint is a plain detectron2 model: it initialises the student.")
            return DetectionCheckpointer(student)._load_model(checkpoint)
        if not is_distiller_state(state):
            return super()._load_model(checkpoint)
        # a distiller checkpoint into a plain detectron2 model: its student, exactly, or an error
        student_state = student_state_dict(state)
        problem = _mismatch(self.model.state_dict(), student_state)
        if problem:
            raise ValueError(
                f"MODEL.WEIGHTS={self._loading!r} is a distiller checkpoint whose student does not match this "
                f"{type(self.model).__name__}: {problem}. Export the student with the distiller config it was "
                f"trained with ({EXPORT_COMMAND}) and load <dir>/model_final.pth with <dir>/config.yaml"
            )
        self.logger.info("Checkpoint is a distiller's: loading its student (%d tensors) into the %s.",
                         len(student_state), type(self.model).__name__)
        checkpoint["model"] = student_state
        return super()._load_model(checkpoint)

    def load(self, path: str, *args, **kwargs):
        self._loading = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._loading = None
