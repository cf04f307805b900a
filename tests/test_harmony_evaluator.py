"""Tests of the harmony evaluator: d2_distill.evaluation.harmony."""

import math
import os
import uuid

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluators
from detectron2.structures import Boxes, BoxMode, Instances

import d2_distill  # noqa: F401  (registers datasets / architectures)
from d2_distill.evaluation import HarmonyEvaluator, harmony_stats

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- #
# A tiny crafted dataset
# --------------------------------------------------------------------------- #
# image 1: GT (0,0,10,10) class 0                                  [XYXY_ABS]
# image 2: GT A (5,5,15,15) class 2, given as XYWH [5,5,10,10]      [XYWH_ABS]
#          GT B (5,5,15,25) class 2                                 [XYXY_ABS]
#          crowd (50,50,60,60) class 2, iscrowd=1 -> ignored
def _dataset_dicts():
    return [
        {
            "file_name": "img1.png", "image_id": 1, "height": 100, "width": 100,
            "annotations": [
                {"bbox": [0, 0, 10, 10], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "iscrowd": 0},
            ],
        },
        {
            "file_name": "img2.png", "image_id": 2, "height": 100, "width": 100,
            "annotations": [
                {"bbox": [5, 5, 10, 10], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 2, "iscrowd": 0},
                {"bbox": [5, 5, 15, 25], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 2},
                {"bbox": [50, 50, 60, 60], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 2, "iscrowd": 1},
            ],
        },
    ]


@pytest.fixture
def dataset_name():
    name = f"harmony_test_{uuid.uuid4().hex[:8]}"
    DatasetCatalog.register(name, _dataset_dicts)
    yield name
    DatasetCatalog.remove(name)


def _instances(boxes, scores, classes, size=(100, 100)):
    inst = Instances(size)
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    inst.pred_classes = torch.tensor(classes, dtype=torch.int64)
    return inst


def _inputs(image_id):
    return {"image_id": image_id, "height": 100, "width": 100, "file_name": f"img{image_id}.png"}


# image 1 detections (GT (0,0,10,10) class 0):
#   (0,0,10,10)   c0 s0.9  -> IoU 1.0, gap 0.1 -> matched, harmonious
#   (0,0,10,5)    c0 s0.9  -> IoU 50/100 = 0.5, gap 0.4 -> matched, NOT harmonious
#   (0,0,10,10)   c1 s0.8  -> no GT of class 1 -> unmatched
#   (20,20,30,30) c0 s0.6  -> IoU 0 -> unmatched
#   (0,0,10,10)   c0 s0.01 -> below min_score 0.05 -> ignored (not even counted)
IMG1 = dict(
    boxes=[[0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]],
    scores=[0.9, 0.9, 0.8, 0.6, 0.01],
    classes=[0, 0, 1, 0, 0],
)
# image 2 detections (GT A (5,5,15,15) c2 [needs XYWH->XYXY], GT B (5,5,15,25) c2, crowd ignored):
#   (5,5,15,15)   c2 s0.7  -> IoU A 1.0 (B 0.5) -> best 1.0, gap 0.3 -> matched, NOT harmonious
#                             (without the XYWH conversion A would be (5,5,10,10): IoU 0.25 / B 0.5)
#   (5,5,15,13)   c2 s0.75 -> IoU A 80/100 = 0.8 (B 80/200 = 0.4) -> gap 0.05 -> matched, harmonious
#   (50,50,60,60) c2 s0.9  -> only the crowd region -> unmatched
IMG2 = dict(
    boxes=[[5, 5, 15, 15], [5, 5, 15, 13], [50, 50, 60, 60]],
    scores=[0.7, 0.75, 0.9],
    classes=[2, 2, 2],
)
# Totals: num_detections = 4 + 3 = 7; num_matched = 2 + 2 = 4; harmonious = 1 + 1 = 2
#   harmonious_ratio = 2 / 4 = 0.5
#   mean_abs_gap = (0.1 + 0.4 + 0.3 + 0.05) / 4 = 0.2125


def test_evaluator_hand_computed(dataset_name):
    ev = HarmonyEvaluator(dataset_name, distributed=False)
    ev.reset()
    ev.process([_inputs(1)], [{"instances": _instances(**IMG1)}])
    ev.process([_inputs(2)], [{"instances": _instances(**IMG2)}])
    res = ev.evaluate()
    assert set(res) == {"harmony"}
    h = res["harmony"]
    assert set(h) == {"harmonious_ratio", "mean_abs_gap", "num_matched", "num_detections"}
    assert h["num_detections"] == 7
    assert h["num_matched"] == 4
    assert h["harmonious_ratio"] == 0.5
    assert h["mean_abs_gap"] == pytest.approx(0.2125, abs=1e-6)

    # reset clears the state; a batch of two images in one process() call gives the same.
    ev.reset()
    ev.process([_inputs(1), _inputs(2)],
               [{"instances": _instances(**IMG1)}, {"instances": _instances(**IMG2)}])
    h2 = ev.evaluate()["harmony"]
    assert h2["num_detections"] == 7 and h2["num_matched"] == 4
    assert h2["harmonious_ratio"] == 0.5
    assert h2["mean_abs_gap"] == pytest.approx(0.2125, abs=1e-6)


def test_evaluator_distributed_single_process(dataset_name):
    # distributed=True (default) in a non-distributed run: comm.gather returns [records].
    ev = HarmonyEvaluator(dataset_name)
    ev.reset()
    ev.process([_inputs(1), _inputs(2)],
               [{"instances": _instances(**IMG1)}, {"instances": _instances(**IMG2)}])
    h = ev.evaluate()["harmony"]
    assert h["num_detections"] == 7 and h["num_matched"] == 4 and h["harmonious_ratio"] == 0.5


def test_evaluator_min_score_and_tolerance(dataset_name):
    # min_score 0.0: the s0.01 detection of image 1 now counts: IoU 1, gap 0.99 -> matched, not harm.
    ev = HarmonyEvaluator(dataset_name, min_score=0.0, distributed=False)
    ev.reset()
    ev.process([_inputs(1)], [{"instances": _instances(**IMG1)}])
    h = ev.evaluate()["harmony"]
    assert h["num_detections"] == 5 and h["num_matched"] == 3
    assert h["harmonious_ratio"] == pytest.approx(1 / 3)
    assert h["mean_abs_gap"] == pytest.approx((0.1 + 0.4 + 0.99) / 3, abs=1e-6)

    # tolerance 0.5: the gap-0.4 detection becomes harmonious too.
    ev = HarmonyEvaluator(dataset_name, tolerance=0.5, distributed=False)
    ev.reset()
    ev.process([_inputs(1)], [{"instances": _instances(**IMG1)}])
    h = ev.evaluate()["harmony"]
    assert h["num_matched"] == 2 and h["harmonious_ratio"] == 1.0


def test_evaluator_no_match(dataset_name, caplog):
    ev = HarmonyEvaluator(dataset_name, distributed=False)
    ev.reset()
    # only unmatched detections (wrong class, no overlap), plus an empty output
    ev.process([_inputs(1), _inputs(2)], [
        {"instances": _instances([[0, 0, 10, 10], [70, 70, 80, 80]], [0.9, 0.9], [3, 0])},
        {"instances": _instances([], [], [])},
    ])
    with caplog.at_level("WARNING"):
        h = ev.evaluate()["harmony"]
    assert h["harmonious_ratio"] == 0.0
    assert math.isnan(h["mean_abs_gap"])
    assert h["num_matched"] == 0 and h["num_detections"] == 2
    assert any("no detection matched" in r.getMessage() for r in caplog.records)

    # nothing processed at all
    ev.reset()
    h = ev.evaluate()["harmony"]
    assert h["num_detections"] == 0 and h["num_matched"] == 0
    assert h["harmonious_ratio"] == 0.0 and math.isnan(h["mean_abs_gap"])


def test_gt_loading(dataset_name):
    ev = HarmonyEvaluator(dataset_name, distributed=False)
    boxes, classes = ev._gt[2]
    # XYWH [5,5,10,10] -> XYXY (5,5,15,15); crowd dropped
    np.testing.assert_array_equal(boxes, [[5, 5, 15, 15], [5, 5, 15, 25]])
    np.testing.assert_array_equal(classes, [2, 2])


def test_harmony_stats_arrays():
    scores = np.array([0.9, 0.9, 0.8, 0.6, 0.7, 0.75])
    ious = np.array([1.0, 0.5, 0.0, 0.0, 1.0, 0.8])
    h = harmony_stats(scores, ious, tolerance=0.2)
    assert h["num_detections"] == 6 and h["num_matched"] == 4
    assert h["harmonious_ratio"] == 0.5
    assert h["mean_abs_gap"] == pytest.approx(0.2125)
    # torch tensors give the same
    ht = harmony_stats(torch.tensor(scores), torch.tensor(ious), tolerance=0.2)
    assert ht == h
    # IoU just below the threshold is not matched
    h = harmony_stats(np.array([0.5]), np.array([0.4999]), tolerance=0.2)
    assert h["num_matched"] == 0 and math.isnan(h["mean_abs_gap"])
    # empty input
    h = harmony_stats(np.zeros(0), np.zeros(0), tolerance=0.2)
    assert h["num_detections"] == 0 and h["harmonious_ratio"] == 0.0 and math.isnan(h["mean_abs_gap"])
    with pytest.raises(ValueError):
        harmony_stats(np.zeros(2), np.zeros(3), tolerance=0.2)


def test_harmony_stats_tolerance_edge():
    # exactly representable values: |0.75 - 0.5| = 0.25 == tol -> harmonious
    h = harmony_stats(np.array([0.75]), np.array([0.5]), tolerance=0.25)
    assert h["harmonious_ratio"] == 1.0 and h["mean_abs_gap"] == 0.25
    h = harmony_stats(torch.tensor([0.75], dtype=torch.float32), torch.tensor([0.5]), tolerance=0.25)
    assert h["harmonious_ratio"] == 1.0
    # just below the gap -> not harmonious
    h = harmony_stats(np.array([0.75]), np.array([0.5]), tolerance=0.125)
    assert h["harmonious_ratio"] == 0.0 and h["mean_abs_gap"] == 0.25


def test_build_evaluator_integration(tmp_path, monkeypatch):
    monkeypatch.setenv("D2_DISTILL_DATA", str(tmp_path))
    monkeypatch.chdir(REPO_ROOT)
    from d2_distill.engine import DistillTrainer, setup_cfg

    cfg = setup_cfg(
        "configs/quickstart/tbd_retinanet.yaml",
        ["DISTILL.EVAL.HARMONY", "True", "OUTPUT_DIR", str(tmp_path / "out")],
    )
    ev = DistillTrainer.build_evaluator(cfg, "shapes_mini_val")
    assert isinstance(ev, DatasetEvaluators)
    harmony = [e for e in ev._evaluators if isinstance(e, HarmonyEvaluator)]
    assert len(harmony) == 1
    assert harmony[0]._tolerance == pytest.approx(cfg.DISTILL.EVAL.HARMONY_TOL)
    assert len(harmony[0]._gt) == 16  # the mini split was generated under tmp_path
    from d2_distill.data import DATASET_VERSION

    assert os.path.isdir(os.path.join(str(tmp_path), DATASET_VERSION))
