from .capture import Recorder
from .distiller import Distiller, student_cfg
from .teacher import FrozenTeacher, build_teacher

__all__ = ["Distiller", "FrozenTeacher", "Recorder", "build_teacher", "student_cfg"]
