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

import os
import zipfile
from typing import Any, Dict

from detectron2.checkpoint import DetectionCheckpointer

from ..student import EXPORT_COMMAND, is_distiller_state, state_mismatch, student_state_dict

__all__ = ["DistillCheckpointer"]


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
        problem = state_mismatch(self.model.state_dict(), student_state)
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

    def _load_file(self, filename: str):
        try:
            return super()._load_file(filename)
        except Exception as e:
            if not filename.endswith(".pth") or not os.path.isfile(filename) or zipfile.is_zipfile(filename):
                raise
            # a truncated or corrupt torch checkpoint (e.g. a job killed while saving):
            # name the file and the newest intact checkpoint beside it
            good = _newest_intact_checkpoint(os.path.dirname(filename) or ".", exclude=filename)
            hint = (f"the newest intact checkpoint there is {good!r}: write its file name into "
                    f"{os.path.join(os.path.dirname(filename), 'last_checkpoint')!r} to resume from it"
                    if good else "no intact checkpoint is beside it")
            raise RuntimeError(f"checkpoint {filename!r} is truncated or corrupt ({type(e).__name__}: {e}); {hint}") from e


def _newest_intact_checkpoint(folder: str, exclude: str) -> str:
    """The newest ``*.pth`` in ``folder`` that is a complete torch zip archive, or ''."""
    candidates = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".pth")]
    candidates = [c for c in candidates if os.path.abspath(c) != os.path.abspath(exclude)]
    for c in sorted(candidates, key=os.path.getmtime, reverse=True):
        if zipfile.is_zipfile(c):
            return c
    return ""
