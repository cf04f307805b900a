"""What DistillTrainer trains: ``build_model(cfg)`` (for a Distiller, the student
only) with the teacher and the method attached."""
from detectron2.modeling import build_model

from d2_distill.modeling import attach_teacher


def build_trainable(cfg):
    return attach_teacher(build_model(cfg), cfg)
