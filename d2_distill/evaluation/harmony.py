"""Harmony metrics (beyond the TBD paper): how well detection scores agree with localisation.

The TBD paper observes that a strong teacher makes a larger share of
*harmonious* predictions (classification score close to the IoU of its box with
the object) than a weak student. :class:`HarmonyEvaluator` measures this on a
dataset, next to COCO AP:

* every final detection (score >= ``min_score``) is matched to its
  best-overlapping ground-truth box **of the same class**; it is *matched* when
  that IoU is >= ``iou_threshold`` (0.5);
* the matching is NOT one-to-one: several detections may match the same GT box
  (there is no greedy assignment as in COCO AP; every detection is judged on
  its own);
* a matched detection is *harmonious* when ``|score - IoU| <= tolerance``
  (``DISTILL.EVAL.HARMONY_TOL``, 0.2); a gap exactly equal to the tolerance
  counts as harmonious.

Reported under the key ``"harmony"``, as fractions in [0, 1] (not percent):

* ``harmonious_ratio``: #harmonious / #matched (0.0 when nothing is matched);
* ``mean_abs_gap``: mean ``|score - IoU|`` over matched detections (NaN when
  nothing is matched);
* ``num_matched``, ``num_detections`` (detections above ``min_score``).

Crowd annotations (``iscrowd=1``) are ignored: a detection on a crowd region is
simply unmatched.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Dict, List, Tuple, Union

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import Boxes, BoxMode, pairwise_iou
from detectron2.utils import comm
from detectron2.utils.logger import create_small_table

__all__ = ["HarmonyEvaluator", "harmony_stats"]

logger = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, torch.Tensor]


def _to_numpy_1d(name: str, x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        x = x.reshape(-1)
    return x


def harmony_stats(
    scores: ArrayLike,
    ious: ArrayLike,
    tolerance: float = 0.2,
    iou_threshold: float = 0.5,
) -> Dict[str, Union[float, int]]:
    """Harmony numbers of a set of detections (pure function).

    Args:
        scores: (N,) detection scores.
        ious: (N,) IoU of each detection with its best-overlapping GT of the
            same class (0 where there is none).
        tolerance: a matched detection is harmonious if ``|score - IoU| <= tolerance``.
        iou_threshold: a detection is matched if its IoU is ``>= iou_threshold``.

    Returns:
        dict with ``harmonious_ratio`` (#harmonious / #matched, a fraction in
        [0, 1]; 0.0 when nothing is matched), ``mean_abs_gap`` (mean
        ``|score - IoU|`` over matched detections; NaN when nothing is matched),
        ``num_matched`` and ``num_detections`` (N). Computed in float64.
    """
    s = _to_numpy_1d("scores", scores)
    u = _to_numpy_1d("ious", ious)
    if s.shape != u.shape:
        raise ValueError(f"scores and ious must have the same length, got {s.shape} and {u.shape}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
    matched = u >= iou_threshold
    num_matched = int(matched.sum())
    if num_matched == 0:
        return {
            "harmonious_ratio": 0.0,
            "mean_abs_gap": float("nan"),
            "num_matched": 0,
            "num_detections": int(s.size),
        }
    gap = np.abs(s[matched] - u[matched])
    return {
        "harmonious_ratio": float((gap <= tolerance).sum()) / num_matched,
        "mean_abs_gap": float(gap.mean()),
        "num_matched": num_matched,
        "num_detections": int(s.size),
    }


def best_same_class_iou(
    det_boxes: torch.Tensor,
    det_classes: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_classes: torch.Tensor,
) -> torch.Tensor:
    """(N,) IoU of each detection with its best-overlapping GT of the same class (0 if none).

    Boxes are XYXY_ABS (N, 4) / (M, 4); classes are (N,) / (M,) ints.
    """
    n = det_boxes.shape[0]
    if n == 0 or gt_boxes.shape[0] == 0:
        return torch.zeros(n, dtype=torch.float32)
    iou = pairwise_iou(Boxes(det_boxes.float()), Boxes(gt_boxes.float()))  # (N, M)
    same = det_classes.view(-1, 1) == gt_classes.view(1, -1)
    iou = torch.where(same, iou, torch.zeros_like(iou))
    return iou.max(dim=1).values


class HarmonyEvaluator(DatasetEvaluator):
    """detectron2 evaluator of the harmony metrics (see the module docstring).

    GT boxes come from ``DatasetCatalog.get(dataset_name)`` (read once, at
    construction), indexed by ``image_id``; the model's outputs are expected in
    the original image resolution, like the dataset dicts (detectron2's
    ``detector_postprocess`` does so), hence no rescaling.

    Note that matching is per detection: several detections may match the same
    GT box (no one-to-one assignment).
    """

    def __init__(
        self,
        dataset_name: str,
        tolerance: float = 0.2,
        iou_threshold: float = 0.5,
        min_score: float = 0.05,
        distributed: bool = True,
    ):
        if not tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
        self._dataset_name = dataset_name
        self._tolerance = float(tolerance)
        self._iou_threshold = float(iou_threshold)
        self._min_score = float(min_score)
        self._distributed = distributed
        self._cpu = torch.device("cpu")
        self._gt = self._load_gt(dataset_name)
        self._warned_missing = False
        self._records: List[Tuple[np.ndarray, np.ndarray]] = []

    @staticmethod
    def _load_gt(dataset_name: str) -> Dict[object, Tuple[np.ndarray, np.ndarray]]:
        """image_id -> (boxes (M, 4) float32 XYXY_ABS, category ids (M,) int64); crowds skipped."""
        gt = {}
        for d in DatasetCatalog.get(dataset_name):
            boxes, classes = [], []
            for ann in d.get("annotations", []):
                if ann.get("iscrowd", 0) == 1:
                    continue
                mode = ann.get("bbox_mode", BoxMode.XYXY_ABS)
                boxes.append(BoxMode.convert(list(ann["bbox"]), mode, BoxMode.XYXY_ABS))
                classes.append(int(ann["category_id"]))
            gt[d["image_id"]] = (
                np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                np.asarray(classes, dtype=np.int64).reshape(-1),
            )
        return gt

    def reset(self):
        self._records = []

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            if "instances" not in out:
                continue
            inst = out["instances"].to(self._cpu)
            scores = inst.scores.float()
            keep = scores >= self._min_score
            scores = scores[keep]
            det_boxes = inst.pred_boxes.tensor[keep]
            det_classes = inst.pred_classes[keep]

            image_id = inp["image_id"]
            if image_id in self._gt:
                gt_boxes, gt_classes = self._gt[image_id]
            else:
                if not self._warned_missing:
                    logger.warning(
                        "HarmonyEvaluator: image_id %r is not in %s; its detections count "
                        "as unmatched (warned once)", image_id, self._dataset_name,
                    )
                    self._warned_missing = True
                gt_boxes = np.zeros((0, 4), np.float32)
                gt_classes = np.zeros((0,), np.int64)

            ious = best_same_class_iou(
                det_boxes, det_classes, torch.from_numpy(gt_boxes), torch.from_numpy(gt_classes)
            )
            self._records.append((scores.numpy().astype(np.float32), ious.numpy().astype(np.float32)))

    def evaluate(self):
        if self._distributed:
            comm.synchronize()
            gathered = comm.gather(self._records, dst=0)
            if not comm.is_main_process():
                return {}
            records = [r for part in gathered for r in part]
        else:
            records = self._records

        if records:
            scores = np.concatenate([r[0] for r in records])
            ious = np.concatenate([r[1] for r in records])
        else:
            scores = ious = np.zeros((0,), np.float32)
        stats = harmony_stats(scores, ious, self._tolerance, self._iou_threshold)
        if stats["num_matched"] == 0:
            logger.warning(
                "HarmonyEvaluator on %s: no detection matched a GT box (IoU >= %.2f) among %d "
                "detections; harmonious_ratio=0, mean_abs_gap=nan",
                self._dataset_name, self._iou_threshold, stats["num_detections"],
            )
        logger.info(
            "Harmony metrics on %s (tolerance %.3f, IoU >= %.2f, score >= %.3f):\n%s",
            self._dataset_name, self._tolerance, self._iou_threshold, self._min_score,
            create_small_table(stats),
        )
        return OrderedDict(harmony=stats)
