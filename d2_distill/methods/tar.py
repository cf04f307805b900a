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

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.structures import Boxes, Instances

from ..losses import (
    rowwise_iou,
    tar_bounded_reg_loss,
    tar_cls_gate,
    tar_cls_loss,
    tar_object_gate,
    tar_reg_gate,
    tar_reg_loss,
)
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
        "feat_gate": ("none", "cls", "iou"),
        "feat_distance": ("l2", "standardized"),
        "reg_loss": ("teacher", "bounded"),
    }
    non_negative = ("feat_weight", "cls_weight", "reg_weight", "teacher_proposals_topk", "reg_bound_margin")
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
        # Feature gate (ours; the paper's abstract: every level adapts to "which model
        # performs more reasonably"): each ground-truth object's Gaussian is kept only
        # where the teacher beats the student on that object's foreground RoIs,
        # by the mean probability of the object's class ("cls") or the mean IoU of
        # the decoded box with the object ("iou"); "none": every object (paper text).
        c.FEAT_GATE = "none"
        # Feature distance: "l2" (paper: squared L2 after the adapter) or
        # "standardized" (ours: both maps standardised per image and channel inside
        # the mask first, so the two FPNs' feature scales stop mattering).
        c.FEAT_DISTANCE = "l2"
        # Regression term: "teacher" (paper: smooth L1 from the student's deltas to
        # the teacher's) or "bounded" (ours, after Chen et al. 2017: the student's own
        # smooth-L1 error to the ground truth, counted only on RoIs where it exceeds
        # the teacher's error plus REG_BOUND_MARGIN; the teacher never pulls the
        # student away from the ground truth).
        c.REG_LOSS = "teacher"
        c.REG_BOUND_MARGIN = 0.0

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
        feat_gate: str = "none",
        feat_distance: str = "l2",
        reg_loss: str = "teacher",
        reg_bound_margin: float = 0.0,
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
        self.feat_gate, self.feat_distance = feat_gate, feat_distance
        self.reg_loss, self.reg_bound_margin = reg_loss, reg_bound_margin
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
    def needs_rois(self) -> bool:
        """Whether the teacher's box head runs on the student's sampled RoIs: for the
        head terms, and for the feature gate."""
        return self.heads_on or (self.feature is not None and self.feat_gate != "none")

    @property
    def needs_teacher(self) -> bool:
        return self.feature is not None or self.heads_on

    def install(self, recorder) -> None:
        if self.feature is not None:
            recorder.record_output("features", "backbone")
        if self.needs_rois:
            inject = self._add_teacher_proposals if self.proposals == "both" else None
            recorder.record_return("sampled", "roi_heads", "label_and_sample_proposals", inject)
            recorder.record_output("box_predictions", "roi_heads.box_predictor")

    # ---- proposal sharing ---------------------------------------------------
    @property
    def shares_teacher_proposals(self) -> bool:
        return self.needs_rois and self.proposals == "both"

    def before_student(self, step: DistillStep) -> None:
        if self.shares_teacher_proposals:
            self._teacher_proposals = self.teacher_proposals(step)

    def teacher_proposals(self, step: DistillStep) -> List[Instances]:
        """The teacher RPN's top TEACHER_PROPOSALS_TOPK proposals per image."""
        with torch.no_grad():
            props, _ = self.teacher.model.proposal_generator(step.teacher_images, step.teacher_features, None)
        return [p[: self.teacher_topk] for p in props]

    def _add_teacher_proposals(self, args, kwargs):
        proposals, targets = args[0], args[1]
        extra, self._teacher_proposals = self._teacher_proposals, []
        if extra:
            proposals = [Instances.cat([p, t]) for p, t in zip(proposals, extra)]
        return (proposals, targets) + tuple(args[2:]), kwargs

    # ---- losses ---------------------------------------------------------------
    def forward(self, step: DistillStep) -> Dict[str, torch.Tensor]:
        losses: Dict[str, torch.Tensor] = {}
        rois = self._roi_predictions(step) if self.needs_rois else None
        if self.feature is not None:
            feats = step.records["features"]
            weights = self._object_gates(step, rois) if self.feat_gate != "none" else None
            masks = self.feature.gaussian_masks(step.gt_instances, feats, self.sigma_ratio, weights)
            losses["loss_tar_feat"] = self.feat_weight * self.feature.imitation_loss(
                feats, step.teacher_features, masks, standardize=self.feat_distance == "standardized")
        if self.heads_on:
            losses.update(self._head_losses(rois))
        return losses

    def teacher_heads(self, step: DistillStep) -> Dict[str, object]:
        """The teacher's RPN (PROPOSALS "both") and its box head on the student's
        sampled RoIs (whenever a term needs the RoIs)."""
        out: Dict[str, object] = {}
        if self.shares_teacher_proposals:
            out["proposals"] = self.teacher_proposals(step)
        if self.needs_rois:
            out["box_predictions"] = self.teacher_box_predictions(
                step, [x.proposal_boxes for x in step.records["sampled"]])
        return out

    def teacher_box_predictions(self, step: DistillStep, boxes: List[Boxes]):
        """The teacher's (logits, deltas) for the given RoIs, on the teacher's features."""
        heads = self.teacher.model.roi_heads
        with torch.no_grad():
            feats = [step.teacher_features[f] for f in heads.box_in_features]
            x = heads.box_head(heads.box_pooler(feats, boxes))
            return heads.box_predictor(x)

    def _roi_predictions(self, step: DistillStep) -> "_RoIs":
        """Both models' predictions on the student's sampled RoIs (proposal sharing)."""
        sampled: List[Instances] = step.records["sampled"]
        s_logits, s_deltas = step.records["box_predictions"]
        boxes = [x.proposal_boxes for x in sampled]
        t_logits, t_deltas = self.teacher_box_predictions(step, boxes)
        gt_classes = torch.cat([x.gt_classes for x in sampled])
        fg = (gt_classes >= 0) & (gt_classes < self.num_classes)
        rois = _RoIs(sampled, s_logits, s_deltas, t_logits, gt_classes, fg)
        if self.reg_weight > 0 or (self.feature is not None and self.feat_gate != "none"):
            # the foreground rows decoded: only for the regression term and the feature gate
            rois.y = gt_classes[fg]
            rois.proposals = torch.cat([b.tensor for b in boxes])[fg]
            rois.gt_boxes = torch.cat(
                [x.gt_boxes.tensor if x.has("gt_boxes") else x.proposal_boxes.tensor for x in sampled]
            )[fg]
            t_transform = self.teacher.model.roi_heads.box_predictor.box2box_transform
            rois.t_boxes = t_transform.apply_deltas(_class_deltas(t_deltas[fg], rois.y), rois.proposals)
        return rois

    def _object_gates(self, step: DistillStep, rois: "_RoIs") -> List[torch.Tensor]:
        """Per image, the (K,) feature gate of its ground-truth objects (FEAT_GATE)."""
        y = rois.y
        if self.feat_gate == "cls":
            idx = y[:, None]
            t_score = F.softmax(rois.t_logits[rois.fg].detach().float(), dim=-1).gather(1, idx)[:, 0]
            s_score = F.softmax(rois.s_logits[rois.fg].detach().float(), dim=-1).gather(1, idx)[:, 0]
        else:  # "iou"
            s_boxes = self.student_transform.apply_deltas(_class_deltas(rois.s_deltas[rois.fg].detach(), y),
                                                          rois.proposals)
            t_score = rowwise_iou(rois.t_boxes, rois.gt_boxes)
            s_score = rowwise_iou(s_boxes, rois.gt_boxes)
        objects = _roi_objects(rois.sampled, step.gt_instances, self.num_classes)[rois.fg]
        gate = tar_object_gate(t_score, s_score, objects, sum(len(x) for x in step.gt_instances))
        if gate.numel():
            self.put_scalar("tar_feat_gate_rate", lambda: gate.float().mean())
        return list(gate.split([len(x) for x in step.gt_instances]))

    def _head_losses(self, rois: "_RoIs") -> Dict[str, torch.Tensor]:
        fg, gt_classes = rois.fg, rois.gt_classes
        # Both head terms are normalised by all sampled RoIs, as detectron2 normalises
        # loss_cls and loss_box_reg, so a weight of 1 makes each as strong as its
        # ground-truth term. The loss functions average over the rows they are given:
        # rescale by rows / sampled.
        sampled_rows = max(gt_classes.numel(), 1)
        out: Dict[str, torch.Tensor] = {}

        if self.cls_weight > 0:
            rows = fg if self.cls_rois == "foreground" else torch.ones_like(fg)
            zs, zt, y = rois.s_logits[rows], rois.t_logits[rows], gt_classes[rows]
            gate = tar_cls_gate(zs, zt, y) if self.cls_gate == "adaptive" else torch.ones_like(y, dtype=torch.bool)
            share = zs.shape[0] / sampled_rows
            out["loss_tar_cls"] = self.cls_weight * share * tar_cls_loss(zs, zt, gate, self.temperature)
            self.put_scalar("tar_cls_gate_rate", lambda: gate.float().mean().nan_to_num(0.0))

        if self.reg_weight > 0:
            proposals, gt_boxes, y, t_boxes = rois.proposals, rois.gt_boxes, rois.y, rois.t_boxes
            ds = _class_deltas(rois.s_deltas[fg], y)
            dt = self.student_transform.get_deltas(proposals, t_boxes)  # teacher, in the student's encoding
            if self.reg_gate == "student":
                ref = self.student_transform.apply_deltas(ds.detach(), proposals)
                gate = tar_reg_gate(t_boxes, ref, gt_boxes)
            elif self.reg_gate == "proposal":
                gate = tar_reg_gate(t_boxes, proposals, gt_boxes)
            else:
                gate = torch.ones_like(y, dtype=torch.bool)
            share = ds.shape[0] / sampled_rows
            if self.reg_loss == "bounded":
                dgt = self.student_transform.get_deltas(proposals, gt_boxes)
                loss, counted = tar_bounded_reg_loss(ds, dt, dgt, gate, self.beta, self.reg_bound_margin,
                                                     return_open=True)
                self.put_scalar("tar_reg_bound_rate", lambda: counted.float().mean().nan_to_num(0.0))
            else:
                loss = tar_reg_loss(ds, dt, gate, self.beta)
            out["loss_tar_reg"] = self.reg_weight * share * loss
            self.put_scalar("tar_reg_gate_rate", lambda: gate.float().mean().nan_to_num(0.0))
        return out


@dataclass
class _RoIs:
    """The student's sampled RoIs with both models' predictions; when a term needs
    them, the ``fg`` rows (foreground) decoded: proposals, GT boxes and classes,
    teacher boxes (None otherwise)."""

    sampled: List[Instances]
    s_logits: torch.Tensor  # (R, K+1), all sampled RoIs
    s_deltas: torch.Tensor  # (R, 4K) or (R, 4)
    t_logits: torch.Tensor  # (R, K+1)
    gt_classes: torch.Tensor  # (R,)
    fg: torch.Tensor  # (R,) bool
    proposals: Optional[torch.Tensor] = None  # (F, 4)
    gt_boxes: Optional[torch.Tensor] = None  # (F, 4)
    y: Optional[torch.Tensor] = None  # (F,)
    t_boxes: Optional[torch.Tensor] = None  # (F, 4)


def _roi_objects(sampled: List[Instances], gt_instances: List[Instances], num_classes: int) -> torch.Tensor:
    """(R,) index of the ground-truth object each sampled RoI is labelled with, counted
    over the batch's objects (image by image), -1 for background RoIs. detectron2
    stores the matched object's box, not its index: the box is looked up among the
    image's ground-truth boxes (identical boxes share the first one's index)."""
    out, offset = [], 0
    for x, gt in zip(sampled, gt_instances):
        k = len(gt)
        fg = (x.gt_classes >= 0) & (x.gt_classes < num_classes)
        if k == 0 or not x.has("gt_boxes"):
            out.append(torch.full_like(x.gt_classes, -1))
        else:
            same = (x.gt_boxes.tensor[:, None, :] == gt.gt_boxes.tensor[None, :, :]).all(dim=-1)  # (R, K)
            idx = same.to(torch.int8).argmax(dim=1) + offset
            out.append(torch.where(fg & same.any(dim=1), idx, torch.full_like(idx, -1)))
        offset += k
    return torch.cat(out)
