"""d2_distill: knowledge distillation for detectron2 detectors (TAR, TBD, PKD, FEATURE).

Importing the package registers the Distiller meta-architecture, the methods
and the built-in shapes datasets with detectron2. detectron2's known deprecation
warnings are not printed while it does (:mod:`d2_distill.quiet`).
"""
from .quiet import known_warnings_ignored as _known_warnings_ignored

with _known_warnings_ignored():
    from .config import add_distill_config
    from . import data  # noqa: F401  (registers shapes_* datasets)
    from . import modeling  # noqa: F401  (registers the Distiller meta-architecture)

__all__ = ["add_distill_config"]
