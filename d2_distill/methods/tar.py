"""TAR: Distilling Object Detectors with Task Adaptive Regularization
(Sun, Tang, Zhang, Xiong, Tian; arXiv 2006.13108), for two-stage detectors.

What it records on the student (forward hooks, nothing recomputed):
* ``backbone`` output (FPN features) for the feature term;
* ``roi_heads.label_and_sample_proposals`` return value: the sampled, labelled
  RoIs (proposal_boxes, gt_classes, gt_boxes);
* ``roi_heads.box_predictor`` output: the student's logits and deltas for them.

What it runs on the teacher (no grad): its backbone (by the distiller), its box
pooler / box head / box predictor on *the student's sampled RoIs* (region
proposal sharing), and its RPN only with ``PROPOSALS: both``.

Losses (DESIGN §4.1): ``loss_tar_feat`` (Gaussian-masked imitation),
``loss_tar_cls`` (gated KL on the considered RoIs), ``loss_tar_reg`` (gated
SmoothL1 between the student's deltas and the teacher's, re-encoded with the
student's box transform, for the GT class). Both head terms are sums over
their RoIs divided by the number of *sampled* RoIs, like detectron2's own
``loss_cls`` / ``loss_box_reg``, so a weight of 1 means "as strong as the
ground-truth term". A component with weight 0 is not computed; with both head
weights 0 the teacher's box head never runs.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from detectron2.config import CfgNode
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage

from .base import DistillMethod, DistillStep, build_feature_imitation, check_same, gaussian_masks, register_method
from .functional import tar_cls_gate, tar_cls_loss, tar_reg_gate, tar_reg_loss

__all__ = ["TARMethod"]


def _class_deltas(deltas: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(R, 4K) class-specific or (R, 4) agnostic deltas -> (R, 4) for ``classes``."""
    if deltas.shape[1] == 4:
        return deltas
    rows = deltas.shape[0]
    return deltas.view(rows, deltas.shape[1] // 4, 4)[torch.arange(rows, device=deltas.device), classes]


@register_method("TAR")
class TARMethod(DistillMethod):
    default_schedule = "linear"  # the paper's distillation decay

    @staticmethod
    def check_configs(student_cfg: CfgNode, teacher_cfg: CfgNode) -> None:
        for who, c in (("student", student_cfg), ("teacher", teacher_cfg)):
            if c.MODEL.META_ARCHITECTURE != "GeneralizedRCNN":
                raise ValueError(
                    f"DISTILL.METHOD=TAR serves two-stage detectors (GeneralizedRCNN); the {who} is "
                    f"{c.MODEL.META_ARCHITECTURE!r} (use DISTILL.METHOD=TBD for RetinaNet)"
                )
            if c.MODEL.ROI_HEADS.NAME != "StandardROIHeads":
                raise ValueError(
                    f"DISTILL.METHOD=TAR needs StandardROIHeads (an FPN box head); the {who} has "
                    f"MODEL.ROI_HEADS.NAME={c.MODEL.ROI_HEADS.NAME!r}"
                )
        check_same("MODEL.ROI_HEADS.NUM_CLASSES", student_cfg.MODEL.ROI_HEADS.NUM_CLASSES,
                   teacher_cfg.MODEL.ROI_HEADS.NUM_CLASSES, "TAR")
        check_same("FPN level names (MODEL.RPN.IN_FEATURES)", list(student_cfg.MODEL.RPN.IN_FEATURES),
                   list(teacher_cfg.MODEL.RPN.IN_FEATURES), "TAR")
        check_same("FPN level names (MODEL.ROI_HEADS.IN_FEATURES)", list(student_cfg.MODEL.ROI_HEADS.IN_FEATURES),
                   list(teacher_cfg.MODEL.ROI_HEADS.IN_FEATURES), "TAR")

    def __init__(self, cfg: CfgNode, student, teacher):
        super().__init__()
        c = cfg.DISTILL.TAR
        for who, m in (("student", student), ("teacher", teacher.model)):
            if not isinstance(m.roi_heads, StandardROIHeads) or not hasattr(m.roi_heads, "box_predictor"):
                raise ValueError(f"DISTILL.METHOD=TAR: the {who}'s ROI heads have no standard box head")
        self.teacher = [teacher]  # a list: not a registered submodule
        self.feat_weight, self.cls_weight, self.reg_weight = c.FEAT_WEIGHT, c.CLS_WEIGHT, c.REG_WEIGHT
        self.sigma_ratio = c.GAUSSIAN_SIGMA_RATIO
        self.proposals = c.PROPOSALS
        self.teacher_topk = c.TEACHER_PROPOSALS_TOPK
        self.cls_rois, self.cls_gate, self.reg_gate = c.CLS_ROIS, c.CLS_GATE, c.REG_GATE
        self.temperature = c.TEMPERATURE
        self.num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
        self.beta = cfg.MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA
        self.student_transform = student.roi_heads.box_predictor.box2box_transform
        self.feature = build_feature_imitation(
            self.feat_weight, c.FEATURE_LEVELS, student, teacher, cfg.DISTILL.ADAPTER, "DISTILL.TAR.FEATURE_LEVELS"
        )
        self._teacher_proposals: List[Instances] = []

    @property
    def heads_on(self) -> bool:
        return self.cls_weight > 0 or self.reg_weight > 0

    @property
    def needs_teacher(self) -> bool:
        return self.feature is not None or self.heads_on

    def install(self, recorder) -> None:
        if self.feature is not None:
            recorder.record_output("features", "backbone")
        if self.heads_on:
            inject = self._add_teacher_proposals if self.proposals == "both" else None
            recorder.record_return("sampled", "roi_heads", "label_and_sample_proposals", inject)
            recorder.record_output("box_predictions", "roi_heads.box_predictor")

    # ---- proposal sharing ---------------------------------------------------
    def before_student(self, step: DistillStep) -> None:
        if not (self.heads_on and self.proposals == "both"):
            return
        teacher = self.teacher[0].model
        with torch.no_grad():
            props, _ = teacher.proposal_generator(step.teacher_images, step.teacher_features, None)
        self._teacher_proposals = [p[: self.teacher_topk] for p in props]

    def _add_teacher_proposals(self, args, kwargs):
        proposals, targets = args[0], args[1]
        extra, self._teacher_proposals = self._teacher_proposals, []
        if extra:
            proposals = [Instances.cat([p, t]) for p, t in zip(proposals, extra)]
        return (proposals, targets) + tuple(args[2:]), kwargs

    # ---- losses ---------------------------------------------------------------
    def forward(self, step: DistillStep) -> Dict[str, torch.Tensor]:
        losses: Dict[str, torch.Tensor] = {}
        if self.feature is not None:
            feats = step.records["features"]
            masks = gaussian_masks(
                step.gt_instances, {k: feats[k].shape for k in self.feature.levels}, self.feature.strides, self.sigma_ratio
            )
            losses["loss_tar_feat"] = self.feat_weight * self.feature(feats, step.teacher_features, masks)
        if self.heads_on:
            losses.update(self._head_losses(step))
        return losses

    def teacher_box_predictions(self, step: DistillStep, boxes: List[Boxes]):
        """The teacher's (logits, deltas) for the given RoIs, on the teacher's features."""
        heads = self.teacher[0].model.roi_heads
        with torch.no_grad():
            feats = [step.teacher_features[f] for f in heads.box_in_features]
            x = heads.box_head(heads.box_pooler(feats, boxes))
            return heads.box_predictor(x)

    def _head_losses(self, step: DistillStep) -> Dict[str, torch.Tensor]:
        sampled: List[Instances] = step.records["sampled"]
        s_logits, s_deltas = step.records["box_predictions"]
        boxes = [x.proposal_boxes for x in sampled]
        t_logits, t_deltas = self.teacher_box_predictions(step, boxes)

        gt_classes = torch.cat([x.gt_classes for x in sampled])
        fg = (gt_classes >= 0) & (gt_classes < self.num_classes)
        # Both head terms are normalised by all sampled RoIs, as detectron2 normalises
        # loss_cls and loss_box_reg: the functional losses average over the rows they
        # are given, so rescale by rows / sampled. With a per-foreground-RoI average
        # (DESIGN 4.1 as first written) the terms were 4-9x the detection losses' own
        # gradients (quickstart, measured), and swamped the ground truth.
        sampled_rows = max(gt_classes.numel(), 1)
        out: Dict[str, torch.Tensor] = {}
        log = get_event_storage().iter % 20 == 0

        if self.cls_weight > 0:
            rows = fg if self.cls_rois == "foreground" else torch.ones_like(fg)
            zs, zt, y = s_logits[rows], t_logits[rows], gt_classes[rows]
            gate = tar_cls_gate(zs, zt, y) if self.cls_gate == "adaptive" else torch.ones_like(y, dtype=torch.bool)
            share = zs.shape[0] / sampled_rows
            out["loss_tar_cls"] = self.cls_weight * share * tar_cls_loss(zs, zt, gate, self.temperature)
            if log:
                get_event_storage().put_scalar("distill/tar_cls_gate_rate", gate.float().mean().nan_to_num(0.0))

        if self.reg_weight > 0:
            proposals = torch.cat([b.tensor for b in boxes])[fg]
            gt_boxes = torch.cat(
                [x.gt_boxes.tensor if x.has("gt_boxes") else x.proposal_boxes.tensor for x in sampled]
            )[fg]
            y = gt_classes[fg]
            ds = _class_deltas(s_deltas[fg], y)
            t_transform = self.teacher[0].model.roi_heads.box_predictor.box2box_transform
            t_boxes = t_transform.apply_deltas(_class_deltas(t_deltas[fg], y), proposals)
            dt = self.student_transform.get_deltas(proposals, t_boxes)  # teacher, in the student's encoding
            if self.reg_gate == "student":
                ref = self.student_transform.apply_deltas(ds.detach(), proposals)
                gate = tar_reg_gate(t_boxes, ref, gt_boxes)
            elif self.reg_gate == "proposal":
                gate = tar_reg_gate(t_boxes, proposals, gt_boxes)
            else:
                gate = torch.ones_like(y, dtype=torch.bool)
            share = ds.shape[0] / sampled_rows
            out["loss_tar_reg"] = self.reg_weight * share * tar_reg_loss(ds, dt, gate, self.beta)
            if log:
                get_event_storage().put_scalar("distill/tar_reg_gate_rate", gate.float().mean().nan_to_num(0.0))
        return out
