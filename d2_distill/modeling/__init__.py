from .capture import Recorder
from .distiller import Distiller, attach_teacher, build_schedule
from .teacher import FrozenTeacher, build_teacher

__all__ = ["Distiller", "FrozenTeacher", "Recorder", "attach_teacher", "build_schedule", "build_teacher"]
