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

Options marked "(paper)" follow the method's paper; every other choice is ours
and exists so it can be ablated.
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_distill_config", "validate_distill_cfg", "METHODS", "ADAPTERS"]

METHODS = ("FEATURE", "TAR", "TBD")
ADAPTERS = ("conv1x1", "conv3x3", "none")


def add_distill_config(cfg: CN) -> None:
    """Add the DISTILL node (and nothing else) to a detectron2 config, in place."""
    _C = cfg
    _C.DISTILL = CN()
    # Which method: "FEATURE" (Gaussian-masked feature imitation, any FPN pair),
    # "TAR" (two-stage: Faster/Mask R-CNN), "TBD" (one-stage: RetinaNet).
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
    # strictly: a missing or unexpected key is an error. Required.
    _C.DISTILL.TEACHER.WEIGHTS = ""
    # Overrides applied to the teacher config after CONFIG_FILE, as KEY VALUE pairs.
    _C.DISTILL.TEACHER.OPTS = []

    # Adapter from each student feature level to the teacher's channels:
    # "conv1x1" (default), "conv3x3", or "none" (only when channels match).
    _C.DISTILL.ADAPTER = "conv1x1"

    _C.DISTILL.SCHEDULE = CN()
    # r(t) multiplying every distillation loss: "linear" (1 - t/T), "step"
    # (per-epoch linear decay), "cosine", "constant", or "" for the method's
    # default (TAR and FEATURE: linear, the paper's distillation decay; TBD: constant).
    _C.DISTILL.SCHEDULE.KIND = ""
    # r is multiplied by min(1, t / WARMUP_ITERS); 0 disables warm-up.
    _C.DISTILL.SCHEDULE.WARMUP_ITERS = 0
    # Iterations per epoch for KIND "step" (required there, > 0).
    _C.DISTILL.SCHEDULE.ITERS_PER_EPOCH = 0

    # ---- FEATURE: generic Gaussian-masked feature imitation -------------------
    _C.DISTILL.FEATURE = CN()
    # Weight of loss_feat.
    _C.DISTILL.FEATURE.WEIGHT = 1.0
    # Feature levels to imitate; empty = every level the student and teacher share.
    _C.DISTILL.FEATURE.LEVELS = []
    # Gaussian sigma as a fraction of the box side (0.25: ~0.135 at the box edge).
    _C.DISTILL.FEATURE.GAUSSIAN_SIGMA_RATIO = 0.25

    # ---- TAR (Sun et al., arXiv 2006.13108) -----------------------------------
    _C.DISTILL.TAR = CN()
    # Region proposal sharing (paper): the student's sampled RoIs go through the
    # teacher's box head. "both" (ours) also adds the teacher's top RPN proposals
    # to the student's candidates before sampling.
    _C.DISTILL.TAR.PROPOSALS = "student"
    # With PROPOSALS "both": how many of the teacher's top proposals per image.
    _C.DISTILL.TAR.TEACHER_PROPOSALS_TOPK = 256
    # Feature level (paper: Gaussian-masked imitation): levels and sigma ratio.
    _C.DISTILL.TAR.FEATURE_LEVELS = ["p2", "p3", "p4", "p5", "p6"]
    _C.DISTILL.TAR.GAUSSIAN_SIGMA_RATIO = 0.25
    # Per-component weights; 0 removes the component (it is not computed).
    _C.DISTILL.TAR.FEAT_WEIGHT = 1.0
    _C.DISTILL.TAR.CLS_WEIGHT = 1.0
    _C.DISTILL.TAR.REG_WEIGHT = 1.0
    # RoIs the classification term covers: "foreground" (ours) or "all".
    _C.DISTILL.TAR.CLS_ROIS = "foreground"
    # "adaptive": teach only RoIs where the teacher gives the GT class a higher
    # probability than the student; "none": every RoI.
    _C.DISTILL.TAR.CLS_GATE = "adaptive"
    # Regression gate: teach where the teacher's box overlaps the GT more than
    # the student's box ("student") or the proposal ("proposal"); "none": always.
    _C.DISTILL.TAR.REG_GATE = "student"
    # Softmax temperature of the classification KL term.
    _C.DISTILL.TAR.TEMPERATURE = 1.0

    # ---- TBD (Tang et al., arXiv 2208.03006) ----------------------------------
    _C.DISTILL.TBD = CN()
    # Harmony Score HS = (1 - |s - u|) * (s*u)^(gamma/2); gamma = 0 is pure agreement.
    _C.DISTILL.TBD.HS_QUALITY_EXP = 1.0
    # Harmonious distillation (HD) weight, its box-term weight, the weight of
    # negative anchors in its classification term, and its temperature.
    _C.DISTILL.TBD.HD_WEIGHT = 1.0
    _C.DISTILL.TBD.HD_REG_WEIGHT = 1.0
    _C.DISTILL.TBD.HD_NEG_WEIGHT = 1.0
    _C.DISTILL.TBD.TEMPERATURE = 1.0
    # Task-decoupled feature distillation (TFD) weight, task balance
    # ("dynamic": from the student's current cls/box losses; "fixed") and the
    # classification share with "fixed".
    _C.DISTILL.TBD.TFD_WEIGHT = 1.0
    _C.DISTILL.TBD.TFD_BALANCE = "dynamic"
    _C.DISTILL.TBD.TFD_CLS_WEIGHT = 0.5

    # ---- Evaluation -------------------------------------------------------------
    _C.DISTILL.EVAL = CN()
    # Add the harmony evaluator (harmonious ratio, mean |score - IoU|) next to COCO AP.
    _C.DISTILL.EVAL.HARMONY = False
    # |score - IoU| at or below which a matched detection counts as harmonious.
    _C.DISTILL.EVAL.HARMONY_TOL = 0.2
    # Also evaluate the teacher (train_net.py --eval-only).
    _C.DISTILL.EVAL.TEACHER = False


_CHOICES = {
    "DISTILL.ADAPTER": ADAPTERS,
    "DISTILL.TAR.PROPOSALS": ("student", "both"),
    "DISTILL.TAR.CLS_ROIS": ("foreground", "all"),
    "DISTILL.TAR.CLS_GATE": ("adaptive", "none"),
    "DISTILL.TAR.REG_GATE": ("student", "proposal", "none"),
    "DISTILL.TBD.TFD_BALANCE": ("dynamic", "fixed"),
}
_NON_NEGATIVE = (
    "DISTILL.FEATURE.WEIGHT",
    "DISTILL.TAR.FEAT_WEIGHT",
    "DISTILL.TAR.CLS_WEIGHT",
    "DISTILL.TAR.REG_WEIGHT",
    "DISTILL.TAR.TEACHER_PROPOSALS_TOPK",
    "DISTILL.TBD.HD_WEIGHT",
    "DISTILL.TBD.HD_REG_WEIGHT",
    "DISTILL.TBD.HD_NEG_WEIGHT",
    "DISTILL.TBD.TFD_WEIGHT",
    "DISTILL.TBD.HS_QUALITY_EXP",
    "DISTILL.SCHEDULE.WARMUP_ITERS",
    "DISTILL.SCHEDULE.ITERS_PER_EPOCH",
)
_POSITIVE = ("DISTILL.TAR.TEMPERATURE", "DISTILL.TBD.TEMPERATURE", "DISTILL.TAR.GAUSSIAN_SIGMA_RATIO",
             "DISTILL.FEATURE.GAUSSIAN_SIGMA_RATIO")


def _get(cfg: CN, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def validate_distill_cfg(cfg: CN) -> None:
    """Raise ValueError naming the bad DISTILL value and what would be valid.

    Checks what can be checked from the config alone, before anything is built.
    """
    from .methods.functional import SCHEDULE_KINDS

    d = cfg.DISTILL
    if d.METHOD not in METHODS:
        raise ValueError(f"DISTILL.METHOD={d.METHOD!r} is not one of {list(METHODS)}")
    if d.STUDENT_META_ARCHITECTURE in ("Distiller", ""):
        raise ValueError(
            f"DISTILL.STUDENT_META_ARCHITECTURE={d.STUDENT_META_ARCHITECTURE!r}: name the student's own "
            "meta-architecture (e.g. 'GeneralizedRCNN', 'RetinaNet')"
        )
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ValueError(f"{key}={_get(cfg, key)!r} is not one of {list(choices)}")
    if d.SCHEDULE.KIND and d.SCHEDULE.KIND not in SCHEDULE_KINDS:
        raise ValueError(f"DISTILL.SCHEDULE.KIND={d.SCHEDULE.KIND!r} is not one of {list(SCHEDULE_KINDS)} (or '' for the method's default)")
    if d.SCHEDULE.KIND == "step" and d.SCHEDULE.ITERS_PER_EPOCH <= 0:
        raise ValueError("DISTILL.SCHEDULE.KIND='step' needs DISTILL.SCHEDULE.ITERS_PER_EPOCH > 0")
    for key in _NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ValueError(f"{key}={_get(cfg, key)!r} must be >= 0")
    for key in _POSITIVE:
        if _get(cfg, key) <= 0:
            raise ValueError(f"{key}={_get(cfg, key)!r} must be > 0")
    if not 0.0 <= d.TBD.TFD_CLS_WEIGHT <= 1.0:
        raise ValueError(f"DISTILL.TBD.TFD_CLS_WEIGHT={d.TBD.TFD_CLS_WEIGHT!r} must be in [0, 1]")
    if not d.EVAL.HARMONY_TOL >= 0:
        raise ValueError(f"DISTILL.EVAL.HARMONY_TOL={d.EVAL.HARMONY_TOL!r} must be >= 0")
