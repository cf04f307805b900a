"""Pure tensor functions of the distillation methods, one module per method plus
the shared ones (no detectron2 state; batch first; shapes in the docstrings):

* :mod:`.schedule` -- the distillation weight schedule r(t);
* :mod:`.common` -- Gaussian GT masks, masked feature imitation, row-aligned IoU / GIoU;
* :mod:`.tar`, :mod:`.tbd`, :mod:`.pkd` -- each method's own losses.

Everything is re-exported here: ``from d2_distill.losses import tar_cls_loss``.
"""
from .common import feature_imitation_loss, gaussian_mask, gaussian_masks, giou_loss_rowwise, masked_standardize, rowwise_iou
from .pkd import pkd_loss
from .schedule import SCHEDULE_KINDS, DistillSchedule, schedule_factor
from .tar import tar_bounded_reg_loss, tar_cls_gate, tar_cls_loss, tar_object_gate, tar_reg_gate, tar_reg_loss
from .tbd import harmony_score, quality_focal_distill_loss, tfd_balance, tfd_mask

__all__ = [
    "SCHEDULE_KINDS",
    "DistillSchedule",
    "schedule_factor",
    "gaussian_mask",
    "gaussian_masks",
    "feature_imitation_loss",
    "masked_standardize",
    "rowwise_iou",
    "giou_loss_rowwise",
    "tar_cls_gate",
    "tar_reg_gate",
    "tar_cls_loss",
    "tar_reg_loss",
    "tar_object_gate",
    "tar_bounded_reg_loss",
    "harmony_score",
    "quality_focal_distill_loss",
    "tfd_mask",
    "tfd_balance",
    "pkd_loss",
]
