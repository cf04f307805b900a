from .checkpoint import DistillCheckpointer
from .trainer import DistillTrainer, setup_cfg

__all__ = ["DistillCheckpointer", "DistillTrainer", "setup_cfg"]
