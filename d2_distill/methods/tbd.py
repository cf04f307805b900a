"""TBD: Task-Balanced Distillation for Object Detection
(Tang, Liu, Li, Song, Liu, Wang, Shao, Duan, Tan; arXiv 2208.03006), for RetinaNet.

What it records on the student (forward hooks, nothing recomputed):
* ``backbone`` output (FPN features), for TFD;
* ``head`` output (per-level logits and deltas);
* ``anchor_generator`` output (the anchors);
* ``label_anchors`` return value (the student's own anchor labels and matched GT).

What it runs on the teacher (no grad): its backbone (by the distiller), its
anchor generator and dense head on its features cropped to the student's sizes.
No post-processing.

Losses, all over anchors flattened across levels:
``loss_tbd_hd`` (Harmony-weighted quality-focal classification imitation +
Harmony-weighted GIoU between student and teacher boxes on positives) and
``loss_tbd_tfd`` (feature imitation under the task-decoupled mask).
"""
from __future__ import annotations

from typing import Dict, List

import torch
from detectron2.config import CfgNode, configurable
from detectron2.modeling.meta_arch.retinanet import permute_to_N_HWA_K
from detectron2.structures import Boxes, pairwise_iou

from ..losses import giou_loss_rowwise, harmony_score, quality_focal_distill_loss, rowwise_iou, tfd_balance, tfd_mask
from .base import DISTILL_METHOD_REGISTRY, DistillMethod, DistillStep, FeatureAdapters, check_same

__all__ = ["TBDMethod", "anchors_per_location"]


def anchors_per_location(cfg: CfgNode) -> List[int]:
    """Anchors per location of each RetinaNet level, from the config alone."""
    sizes, ratios = cfg.MODEL.ANCHOR_GENERATOR.SIZES, cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS
    n = len(cfg.MODEL.RETINANET.IN_FEATURES)
    sizes = list(sizes) * n if len(sizes) == 1 else list(sizes)
    ratios = list(ratios) * n if len(ratios) == 1 else list(ratios)
    return [len(s) * len(r) for s, r in zip(sizes, ratios)]


def _flatten(per_level: List[torch.Tensor], k: int) -> torch.Tensor:
    """Per-level (N, A*k, H, W) -> (N, sum H*W*A, k), detectron2's anchor order."""
    return torch.cat([permute_to_N_HWA_K(x, k) for x in per_level], dim=1)


@DISTILL_METHOD_REGISTRY.register()
class TBDMethod(DistillMethod):
    name = "TBD"
    loss_names = ("loss_tbd_hd", "loss_tbd_tfd")
    components = {"HD": "DISTILL.TBD.HD_WEIGHT", "TFD": "DISTILL.TBD.TFD_WEIGHT"}
    student_architectures = ("RetinaNet",)
    default_schedule = "constant"
    choices = {"tfd_balance": ("dynamic", "fixed"), "hd_weighting": ("harmony", "uniform")}
    non_negative = ("hs_quality_exp", "hd_weight", "hd_reg_weight", "hd_neg_weight", "tfd_weight")
    positive = ("temperature",)
    unit_interval = ("tfd_cls_weight",)

    @classmethod
    def add_config(cls, cfg: CfgNode) -> None:
        c = cfg.DISTILL.TBD = CfgNode()
        # Harmony Score HS = (1 - |s - u|) * (s*u)^(gamma/2); gamma = 0 is pure agreement.
        c.HS_QUALITY_EXP = 1.0
        # Harmonious distillation (HD) weight, its box-term weight, the weight of
        # negative anchors in its classification term, and its temperature.
        c.HD_WEIGHT = 1.0
        c.HD_REG_WEIGHT = 1.0
        c.HD_NEG_WEIGHT = 1.0
        c.TEMPERATURE = 1.0
        # Weights of HD's positive anchors: "harmony" (the paper: each anchor's
        # Harmony Score) or "uniform" (1 on every positive; the ablation of the
        # Harmony Score itself).
        c.HD_WEIGHTING = "harmony"
        # Task-decoupled feature distillation (TFD) weight, task balance
        # ("dynamic": from the student's current cls/box losses; "fixed") and the
        # classification share with "fixed".
        c.TFD_WEIGHT = 1.0
        c.TFD_BALANCE = "dynamic"
        c.TFD_CLS_WEIGHT = 0.5

    @classmethod
    def check_configs(cls, student_cfg: CfgNode, teacher_cfg: CfgNode) -> None:
        super().check_configs(student_cfg, teacher_cfg)
        s, t = student_cfg.MODEL, teacher_cfg.MODEL
        check_same("MODEL.RETINANET.NUM_CLASSES", s.RETINANET.NUM_CLASSES, t.RETINANET.NUM_CLASSES, "TBD")
        check_same("MODEL.RETINANET.IN_FEATURES", list(s.RETINANET.IN_FEATURES), list(t.RETINANET.IN_FEATURES), "TBD")
        check_same("anchors per location (MODEL.ANCHOR_GENERATOR)", anchors_per_location(student_cfg),
                   anchors_per_location(teacher_cfg), "TBD")

    @configurable
    def __init__(
        self,
        *,
        student,
        teacher,
        hs_quality_exp: float = 1.0,
        hd_weight: float = 1.0,
        hd_reg_weight: float = 1.0,
        hd_neg_weight: float = 1.0,
        temperature: float = 1.0,
        hd_weighting: str = "harmony",
        tfd_weight: float = 1.0,
        tfd_balance: str = "dynamic",
        tfd_cls_weight: float = 0.5,
        adapter: str = "conv1x1",
    ):
        self.check_options(**locals())
        super().__init__(teacher=teacher)
        self.hd_weight, self.hd_reg_weight, self.hd_neg_weight = hd_weight, hd_reg_weight, hd_neg_weight
        self.tfd_weight, self.tfd_balance, self.tfd_cls_weight = tfd_weight, tfd_balance, tfd_cls_weight
        self.quality_exp = hs_quality_exp
        self.hd_weighting = hd_weighting
        self.temperature = temperature
        self.num_classes = student.num_classes
        self.in_features = list(student.head_in_features)
        self.student_transform = student.box2box_transform
        self.num_anchors = dict(zip(self.in_features, student.anchor_generator.num_anchors))
        self.tfd = (
            FeatureAdapters(student, teacher, self.in_features, adapter, "MODEL.RETINANET.IN_FEATURES")
            if tfd_weight > 0 else None
        )

    @property
    def needs_teacher(self) -> bool:
        return self.hd_weight > 0 or self.tfd is not None

    def install(self, recorder) -> None:
        recorder.record_output("features", "backbone")
        recorder.record_output("head", "head")
        recorder.record_output("anchors", "anchor_generator")
        recorder.record_return("labels", "", "label_anchors")

    def teacher_heads(self, step: DistillStep) -> Dict[str, object]:
        """The teacher's dense head and anchors on every level."""
        return {"dense": self.teacher_dense(step, step.records["features"])}

    def teacher_dense(self, step: DistillStep, student_feats: Dict[str, torch.Tensor]):
        """The teacher's per-level (logits, deltas) and anchors, on its features cropped to the student's."""
        t = self.teacher.model
        with torch.no_grad():
            feats = [
                step.teacher_features[f][..., : student_feats[f].shape[-2], : student_feats[f].shape[-1]]
                for f in t.head_in_features
            ]
            logits, deltas = t.head(feats)
            anchors = t.anchor_generator(feats)
        return logits, deltas, anchors

    def forward(self, step: DistillStep) -> Dict[str, torch.Tensor]:
        r = step.records
        s_logits_l, s_deltas_l = r["head"]
        t_logits_l, t_deltas_l, t_anchors = self.teacher_heads(step)["dense"]
        K = self.num_classes
        s_logits, t_logits = _flatten(s_logits_l, K), _flatten(t_logits_l, K)  # (N, R, K)
        s_deltas, t_deltas = _flatten(s_deltas_l, 4), _flatten(t_deltas_l, 4)  # (N, R, 4)
        gt_labels = torch.stack(r["labels"][0])  # (N, R): class, K = background, -1 = ignored
        gt_boxes = torch.stack(r["labels"][1])  # (N, R, 4)

        N, R = gt_labels.shape
        s_anchors = Boxes.cat(r["anchors"]).tensor
        t_anchors = Boxes.cat(t_anchors).tensor
        t_transform = self.teacher.model.box2box_transform
        t_boxes = t_transform.apply_deltas(t_deltas.reshape(-1, 4), t_anchors.repeat(N, 1)).view(N, R, 4)
        t_prob = t_logits.float().sigmoid()  # s_T = sigma(z_T): Harmony Score and the TFD mask (no temperature)

        pos = (gt_labels >= 0) & (gt_labels < K)
        losses: Dict[str, torch.Tensor] = {}
        if self.hd_weight > 0:
            losses["loss_tbd_hd"] = self.hd_weight * self._hd_loss(
                s_logits, t_logits, t_prob, s_deltas, s_anchors, t_boxes, gt_labels, gt_boxes, pos
            )
        if self.tfd is not None:
            losses["loss_tbd_tfd"] = self.tfd_weight * self._tfd_loss(step, r, t_logits, t_boxes, t_prob)
        return losses

    def _hd_loss(self, s_logits, t_logits, t_prob, s_deltas, s_anchors, t_boxes, gt_labels, gt_boxes, pos):
        K = self.num_classes
        valid = gt_labels >= 0
        n_pos = pos.sum().clamp(min=1).float()
        # Harmony Score on positive anchors: teacher score of the GT class vs its IoU with the GT.
        y = gt_labels.clamp(0, K - 1)
        s_score = t_prob.gather(-1, y.unsqueeze(-1)).squeeze(-1)  # (N, R)
        iou = rowwise_iou(t_boxes.reshape(-1, 4), gt_boxes.reshape(-1, 4)).view_as(s_score)
        hs = torch.where(pos, harmony_score(s_score, iou, self.quality_exp), torch.zeros_like(s_score))
        pos_w = hs if self.hd_weighting == "harmony" else pos.to(hs.dtype)
        w = torch.where(pos, pos_w, torch.full_like(hs, self.hd_neg_weight)) * valid
        qf = quality_focal_distill_loss(s_logits, t_logits, self.temperature).sum(-1)  # (N, R)
        cls = (w * qf).sum() / n_pos

        s_boxes = self.student_transform.apply_deltas(s_deltas[pos], s_anchors.repeat(pos.shape[0], 1)[pos.reshape(-1)])
        reg = (pos_w[pos] * giou_loss_rowwise(s_boxes, t_boxes[pos])).sum() / n_pos
        self.put_scalar("tbd_mean_hs", lambda: hs.sum() / n_pos)
        return cls + self.hd_reg_weight * reg

    def _tfd_loss(self, step: DistillStep, r, t_logits, t_boxes, t_prob) -> torch.Tensor:
        feats = r["features"]
        N = t_logits.shape[0]
        # M_reg per anchor: best IoU of the teacher's box with any GT of the image (0 without GT).
        max_iou = torch.zeros(t_boxes.shape[:2], device=t_boxes.device)
        for i, inst in enumerate(step.gt_instances):
            if len(inst) > 0:
                max_iou[i] = pairwise_iou(Boxes(t_boxes[i]), inst.gt_boxes).max(dim=1).values
        if self.tfd_balance == "dynamic":
            w_cls = tfd_balance(step.student_losses["loss_cls"], step.student_losses["loss_box_reg"])
        else:
            w_cls = self.tfd_cls_weight
        masks, start, K = {}, 0, self.num_classes
        for f in self.in_features:
            h, w = feats[f].shape[-2:]
            a = self.num_anchors[f]
            n = h * w * a
            prob = t_prob[:, start : start + n].reshape(N, h, w, a, K).permute(0, 3, 4, 1, 2)
            iou = max_iou[:, start : start + n].reshape(N, h, w, a).permute(0, 3, 1, 2)
            masks[f] = tfd_mask(prob, iou, w_cls)
            start += n
        self.put_scalar("tbd_tfd_cls_weight", w_cls)
        return self.tfd.imitation_loss(feats, step.teacher_features, masks)
