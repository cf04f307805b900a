from .capture import Recorder
from .distiller import Distiller, attach_teacher, build_schedule
from .teacher import FrozenTeacher, build_teacher
from ..student import student_cfg  # re-exported for demo.py until it imports d2_distill.student

__all__ = ["Distiller", "FrozenTeacher", "Recorder", "attach_teacher", "build_schedule", "build_teacher", "student_cfg"]
