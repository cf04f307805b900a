"""The ``DISTILL`` config node.

``add_distill_config(cfg)`` adds every option d2_distill reads, with its default.
A distillation config is an ordinary detectron2 config of the *student* plus:

    MODEL:
      META_ARCHITECTURE: "Distiller"
    DISTILL:
      STUDENT_META_ARCHITECTURE: "GeneralizedRCNN"
      METHOD: "TAR"
      TEACHER:
        CONFIG_FILE: "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml"
        WEIGHTS: "path/or/url/to/teacher.pth"

The core options live here; each registered method adds its own node
``DISTILL.<METHOD>`` (its ``add_config`` classmethod) and checks its own values.
Options marked "(paper)" follow the method's paper; every other choice is ours
and exists so it can be ablated.
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_distill_config", "validate_distill_cfg", "ADAPTERS"]

ADAPTERS = ("conv1x1", "conv3x3", "none")


def add_distill_config(cfg: CN) -> None:
    """Add the DISTILL node (and nothing else) to a detectron2 config, in place."""
    _C = cfg
    _C.DISTILL = CN()
    # Which method: the name of a method in d2_distill.methods.DISTILL_METHOD_REGISTRY
    # (each one's options are in DISTILL.<its name>; the registry lists them all).
    _C.DISTILL.METHOD = "TAR"
    # The student's own meta-architecture. MODEL.META_ARCHITECTURE is "Distiller";
    # the student is built by detectron2's build_model with this name instead.
    _C.DISTILL.STUDENT_META_ARCHITECTURE = "GeneralizedRCNN"

    _C.DISTILL.TEACHER = CN()
    # The teacher's own detectron2 config: a file path (absolute, relative to the
    # working directory, or relative to this project's root) or a model-zoo name
    # such as "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml".
    _C.DISTILL.TEACHER.CONFIG_FILE = ""
    # The teacher's trained weights (path or URL; .pth or model-zoo .pkl). Loaded
    # strictly: a missing or unexpected key, or a NaN/Inf value, is an error.
    # Required for training; evaluation and export never load the teacher.
    _C.DISTILL.TEACHER.WEIGHTS = ""
    # Overrides applied to the teacher config after CONFIG_FILE, as KEY VALUE pairs.
    _C.DISTILL.TEACHER.OPTS = []

    # Adapter from each student feature level to the teacher's channels:
    # "conv1x1" (default), "conv3x3", or "none" (only when channels match).
    _C.DISTILL.ADAPTER = "conv1x1"

    _C.DISTILL.SCHEDULE = CN()
    # r(t) multiplying every distillation loss: "linear" (1 - t/T), "step"
    # (per-epoch linear decay), "cosine", "constant", or "" for the method's
    # own default (its default_schedule).
    _C.DISTILL.SCHEDULE.KIND = ""
    # r is multiplied by min(1, t / WARMUP_ITERS); 0 disables warm-up.
    _C.DISTILL.SCHEDULE.WARMUP_ITERS = 0
    # Iterations per epoch for KIND "step" (required there, > 0).
    _C.DISTILL.SCHEDULE.ITERS_PER_EPOCH = 0

    # Every LOG_PERIOD iterations the methods log their own scalars (gate-open rates,
    # mean Harmony Score, TFD balance, ...) as distill/<name>; 0 = never.
    _C.DISTILL.LOG_PERIOD = 20

    _C.DISTILL.DIAGNOSTICS = CN()
    # Every GRAD_PERIOD iterations, log distill/grad_ratio/<loss>/<part>: the norm of
    # each distillation loss's gradient on the student's backbone and head, divided
    # by that of the detection losses (d2_distill.modeling.diagnostics). 0 = off:
    # nothing is computed. Each logged step costs one extra backward per loss and part.
    _C.DISTILL.DIAGNOSTICS.GRAD_PERIOD = 0

    # ---- Evaluation -------------------------------------------------------------
    _C.DISTILL.EVAL = CN()
    # Add the harmony evaluator (harmonious ratio, mean |score - IoU|) next to COCO AP.
    _C.DISTILL.EVAL.HARMONY = False
    # |score - IoU| at or below which a matched detection counts as harmonious.
    _C.DISTILL.EVAL.HARMONY_TOL = 0.2
    # Also evaluate the teacher (train_net.py --eval-only).
    _C.DISTILL.EVAL.TEACHER = False

    from .methods import DISTILL_METHOD_REGISTRY

    for _, method in DISTILL_METHOD_REGISTRY:  # every method adds DISTILL.<its name>
        method.add_config(_C)


def validate_distill_cfg(cfg: CN) -> None:
    """Raise ValueError naming the bad DISTILL value and what would be valid.

    Checks what can be checked from the config alone, before anything is built:
    the core options here, the chosen method's options by the method itself.
    """
    from .losses import SCHEDULE_KINDS
    from .methods import method_class
    from .student import student_cfg

    d = cfg.DISTILL
    method = method_class(d.METHOD)
    student_cfg(cfg)  # names the student's meta-architecture
    if d.ADAPTER not in ADAPTERS:
        raise ValueError(f"DISTILL.ADAPTER={d.ADAPTER!r} is not one of {list(ADAPTERS)}")
    if d.SCHEDULE.KIND and d.SCHEDULE.KIND not in SCHEDULE_KINDS:
        raise ValueError(f"DISTILL.SCHEDULE.KIND={d.SCHEDULE.KIND!r} is not one of {list(SCHEDULE_KINDS)} (or '' for the method's default)")
    if d.SCHEDULE.KIND == "step" and d.SCHEDULE.ITERS_PER_EPOCH <= 0:
        raise ValueError("DISTILL.SCHEDULE.KIND='step' needs DISTILL.SCHEDULE.ITERS_PER_EPOCH > 0")
    for key in ("WARMUP_ITERS", "ITERS_PER_EPOCH"):
        if d.SCHEDULE[key] < 0:
            raise ValueError(f"DISTILL.SCHEDULE.{key}={d.SCHEDULE[key]!r} must be >= 0")
    if d.LOG_PERIOD < 0:
        raise ValueError(f"DISTILL.LOG_PERIOD={d.LOG_PERIOD!r} must be >= 0 (0 = never)")
    if d.DIAGNOSTICS.GRAD_PERIOD < 0:
        raise ValueError(f"DISTILL.DIAGNOSTICS.GRAD_PERIOD={d.DIAGNOSTICS.GRAD_PERIOD!r} must be >= 0 (0 = off)")
    if not d.EVAL.HARMONY_TOL >= 0:
        raise ValueError(f"DISTILL.EVAL.HARMONY_TOL={d.EVAL.HARMONY_TOL!r} must be >= 0")
    method.validate_config(cfg)
