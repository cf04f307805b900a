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

Losses: ``loss_tar_feat`` (Gaussian-masked feature imitation),
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
from detectron2.config import CfgNode, configurable
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage

from ..losses import tar_cls_gate, tar_cls_loss, tar_reg_gate, tar_reg_loss
from .base import DISTILL_METHOD_REGISTRY, DistillMethod, DistillStep, FeatureAdapters, check_same

__all__ = ["TARMethod"]


def _class_deltas(deltas: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(R, 4K) class-specific or (R, 4) agnostic deltas -> (R, 4) for ``classes``."""
    if deltas.shape[1] == 4:
        return deltas
    rows = deltas.shape[0]
    return deltas.view(rows, deltas.shape[1] // 4, 4)[torch.arange(rows, device=deltas.device), classes]


@DISTILL_METHOD_REGISTRY.register()
class TARMethod(DistillMethod):
    name = "TAR"
    loss_names = ("loss_tar_feat", "loss_tar_cls", "loss_tar_reg")
    components = {
        "feature": "DISTILL.TAR.FEAT_WEIGHT",
        "classification": "DISTILL.TAR.CLS_WEIGHT",
        "regression": "DISTILL.TAR.REG_WEIGHT",
    }
    student_architectures = ("GeneralizedRCNN",)
    default_schedule = "linear"  # the paper's distillation decay
    choices = {
        "proposals": ("student", "both"),
        "cls_rois": ("foreground", "all"),
        "cls_gate": ("adaptive", "none"),
        "reg_gate": ("student", "proposal", "none"),
    }
    non_negative = ("feat_weight", "cls_weight", "reg_weight", "teacher_proposals_topk")
    positive = ("temperature", "gaussian_sigma_ratio")

    @classmethod
    def add_config(cls, cfg: CfgNode) -> None:
        c = cfg.DISTILL.TAR = CfgNode()
        # Region proposal sharing (paper): the student's sampled RoIs go through the
        # teacher's box head. "both" (ours) also adds the teacher's top RPN proposals
        # to the student's candidates before sampling.
        c.PROPOSALS = "student"
        # With PROPOSALS "both": how many of the teacher's top proposals per image.
        c.TEACHER_PROPOSALS_TOPK = 256
        # Feature level (paper: Gaussian-masked imitation): levels and sigma ratio.
        c.FEATURE_LEVELS = ["p2", "p3", "p4", "p5", "p6"]
        c.GAUSSIAN_SIGMA_RATIO = 0.25
        # Per-component weights; 0 removes the component (it is not computed).
        c.FEAT_WEIGHT = 1.0
        c.CLS_WEIGHT = 1.0
        c.REG_WEIGHT = 1.0
        # RoIs the classification term covers: "foreground" (ours) or "all".
        c.CLS_ROIS = "foreground"
        # "adaptive": teach only RoIs where the teacher gives the GT class a higher
        # probability than the student; "none": every RoI.
        c.CLS_GATE = "adaptive"
        # Regression gate: teach where the teacher's box overlaps the GT more than
        # the proposal ("proposal", what the paper compares: does the teacher's
        # refinement improve on the proposal?), more than the student's own box
        # ("student"), or always ("none").
        c.REG_GATE = "proposal"
        # Softmax temperature of the classification KL term.
        c.TEMPERATURE = 1.0

    @classmethod
    def check_configs(cls, student_cfg: CfgNode, teacher_cfg: CfgNode) -> None:
        super().check_configs(student_cfg, teacher_cfg)
        for who, c in (("student", student_cfg), ("teacher", teacher_cfg)):
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

    @configurable
    def __init__(
        self,
        *,
        student,
        teacher,
        proposals: str = "student",
        teacher_proposals_topk: int = 256,
        feature_levels=("p2", "p3", "p4", "p5", "p6"),
        gaussian_sigma_ratio: float = 0.25,
        feat_weight: float = 1.0,
        cls_weight: float = 1.0,
        reg_weight: float = 1.0,
        cls_rois: str = "foreground",
        cls_gate: str = "adaptive",
        reg_gate: str = "proposal",
        temperature: float = 1.0,
        adapter: str = "conv1x1",
    ):
        self.check_options(**locals())
        super().__init__(teacher=teacher)
        for who, m in (("student", student), ("teacher", teacher.model)):
            if not isinstance(m.roi_heads, StandardROIHeads) or not hasattr(m.roi_heads, "box_predictor"):
                raise ValueError(f"DISTILL.METHOD=TAR: the {who}'s ROI heads have no standard box head")
        self.feat_weight, self.cls_weight, self.reg_weight = feat_weight, cls_weight, reg_weight
        self.sigma_ratio = gaussian_sigma_ratio
        self.proposals = proposals
        self.teacher_topk = teacher_proposals_topk
        self.cls_rois, self.cls_gate, self.reg_gate = cls_rois, cls_gate, reg_gate
        self.temperature = temperature
        predictor = student.roi_heads.box_predictor
        self.num_classes = predictor.num_classes
        self.beta = predictor.smooth_l1_beta
        self.student_transform = predictor.box2box_transform
        self.feature = (
            FeatureAdapters(student, teacher, feature_levels, adapter, "DISTILL.TAR.FEATURE_LEVELS")
            if feat_weight > 0 else None
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
        teacher = self.teacher.model
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
            masks = self.feature.gaussian_masks(step.gt_instances, feats, self.sigma_ratio)
            losses["loss_tar_feat"] = self.feat_weight * self.feature.imitation_loss(feats, step.teacher_features, masks)
        if self.heads_on:
            losses.update(self._head_losses(step))
        return losses

    def teacher_box_predictions(self, step: DistillStep, boxes: List[Boxes]):
        """The teacher's (logits, deltas) for the given RoIs, on the teacher's features."""
        heads = self.teacher.model.roi_heads
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
        # loss_cls and loss_box_reg, so a weight of 1 makes each as strong as its
        # ground-truth term. The loss functions average over the rows they are given:
        # rescale by rows / sampled.
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
            t_transform = self.teacher.model.roi_heads.box_predictor.box2box_transform
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
