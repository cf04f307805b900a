"""TBD through the user's path (quickstart config -> Distiller -> trainer)."""
import pytest
import torch
from detectron2.utils.events import EventStorage

from d2_distill.methods.tbd import anchors_per_location

from helpers import cfg_for, changed_keys, fake_batch, train
from trainable import build_trainable as build


def _step(model, batch, it=0):
    model.train()
    with EventStorage(it) as storage:
        losses = model(batch)
    return losses, storage


def test_losses_and_teacher_parts(retina_teacher_weights):
    model = build(cfg_for("tbd_retinanet.yaml", teacher=retina_teacher_weights))
    calls = {"head": 0, "student_head": 0}
    model.teacher.model.head.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))
    model.student.head.register_forward_hook(lambda *a: calls.__setitem__("student_head", calls["student_head"] + 1))
    losses, _ = _step(model, fake_batch(2))
    assert {"loss_cls", "loss_box_reg", "loss_tbd_hd", "loss_tbd_tfd"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    assert calls == {"head": 1, "student_head": 1}  # student outputs recorded, not recomputed
    assert model.schedule.kind == "constant"
    total = sum(losses.values())
    total.backward()
    assert all(p.grad is not None for p in model.method.parameters())


def test_hd_box_term_only_on_positive_anchors(retina_teacher_weights, monkeypatch):
    """The GIoU term gets exactly the positive anchors of the student's own matcher."""
    import d2_distill.methods.tbd as tbd
    from detectron2.modeling.meta_arch.retinanet import RetinaNet

    giou_rows, positives = [], []
    original_giou, original_label = tbd.giou_loss_rowwise, RetinaNet.label_anchors

    def giou_spy(a, b):
        giou_rows.append(a.shape[0])
        return original_giou(a, b)

    def label_spy(self, anchors, gt):
        labels, boxes = original_label(self, anchors, gt)
        positives.append(sum(int(((lab >= 0) & (lab < self.num_classes)).sum()) for lab in labels))
        return labels, boxes

    monkeypatch.setattr(tbd, "giou_loss_rowwise", giou_spy)
    monkeypatch.setattr(RetinaNet, "label_anchors", label_spy)  # before the recorder wraps it
    model = build(cfg_for("tbd_retinanet.yaml", "DISTILL.TBD.TFD_WEIGHT", "0.0", teacher=retina_teacher_weights))
    losses, _ = _step(model, fake_batch(2))
    assert "loss_tbd_tfd" not in losses and torch.isfinite(losses["loss_tbd_hd"])
    assert positives[0] > 0 and giou_rows == positives


@pytest.mark.parametrize("boxes", [0, 2])
def test_no_nan_without_ground_truth_or_positives(retina_teacher_weights, boxes):
    opts = [] if boxes == 0 else ["MODEL.RETINANET.IOU_THRESHOLDS", "[0.99, 0.999]"]  # no anchor that positive
    model = build(cfg_for("tbd_retinanet.yaml", *opts, teacher=retina_teacher_weights))
    losses, _ = _step(model, fake_batch(2, boxes_per_image=boxes))
    for k in ("loss_tbd_hd", "loss_tbd_tfd"):
        assert torch.isfinite(losses[k]), k
    sum(losses.values()).backward()
    for p in model.method.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_all_anchors_ignored(retina_teacher_weights, monkeypatch):
    """Every anchor labelled 'ignore' (-1): the distillation losses stay finite."""
    from detectron2.modeling.meta_arch.retinanet import RetinaNet

    original = RetinaNet.label_anchors

    def all_ignored(self, anchors, gt):
        labels, boxes = original(self, anchors, gt)
        return [torch.full_like(lab, -1) for lab in labels], boxes

    monkeypatch.setattr(RetinaNet, "label_anchors", all_ignored)
    model = build(cfg_for("tbd_retinanet.yaml", teacher=retina_teacher_weights))
    losses, _ = _step(model, fake_batch(2))
    assert losses["loss_tbd_hd"] == 0 and torch.isfinite(losses["loss_tbd_tfd"])


def test_dynamic_balance_follows_the_students_losses(retina_teacher_weights, monkeypatch):
    """w_cls = L_cls / (L_cls + L_reg) of the student's current losses, passed to the TFD mask."""
    import d2_distill.methods.tbd as tbd

    weights = []
    original = tbd.tfd_mask
    monkeypatch.setattr(tbd, "tfd_mask", lambda p, i, w: (weights.append(w), original(p, i, w))[1])
    model = build(cfg_for("tbd_retinanet.yaml", teacher=retina_teacher_weights))
    losses, _ = _step(model, fake_batch(2))
    expected = losses["loss_cls"] / (losses["loss_cls"] + losses["loss_box_reg"])
    assert len(weights) == len(model.method.in_features)
    assert all(float(w) == pytest.approx(float(expected.detach())) for w in weights)

    weights.clear()
    fixed = build(cfg_for("tbd_retinanet.yaml", "DISTILL.TBD.TFD_BALANCE", "fixed", "DISTILL.TBD.TFD_CLS_WEIGHT", "0.3",
                          teacher=retina_teacher_weights))
    _step(fixed, fake_batch(2))
    assert weights and all(w == 0.3 for w in weights)


@pytest.mark.parametrize(
    "teacher_opts, message",
    [
        ("['MODEL.RETINANET.NUM_CLASSES', 5]", "MODEL.RETINANET.NUM_CLASSES"),
        ("['MODEL.RETINANET.IN_FEATURES', ['p3', 'p4', 'p5', 'p6']]", "MODEL.RETINANET.IN_FEATURES"),
        ("['MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS', [[1.0, 2.0]]]", "anchors per location"),
    ],
)
def test_mismatched_teacher_fails_at_build(retina_teacher_weights, teacher_opts, message):
    cfg = cfg_for("tbd_retinanet.yaml", "DISTILL.TEACHER.OPTS", teacher_opts, teacher=retina_teacher_weights)
    with pytest.raises(ValueError, match=message):
        build(cfg)


def test_tbd_on_faster_rcnn_fails_at_build(frcnn_teacher_weights):
    cfg = cfg_for("tar_faster_rcnn_paper.yaml", "DISTILL.METHOD", "TBD", teacher=frcnn_teacher_weights)
    with pytest.raises(ValueError, match=r"DISTILL.METHOD=TBD serves RetinaNet detectors; the student is \'GeneralizedRCNN\' \(methods for GeneralizedRCNN: FEATURE, PKD, TAR\)"):
        build(cfg)


def test_quickstart_tbd_trains_and_reports_harmony(retina_teacher_weights, tmp_path):
    trainer = train(cfg_for("tbd_retinanet.yaml", teacher=retina_teacher_weights, out_dir=tmp_path, iters=2))
    keys = set(trainer.storage.histories())
    assert {"loss_tbd_hd", "loss_tbd_tfd", "distill/schedule_factor"} <= keys
    results = trainer._last_eval_results
    assert "bbox" in results and "harmony" in results
    assert 0.0 <= results["harmony"]["harmonious_ratio"] <= 1.0


def test_anchor_count_from_config():
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.MODEL.RETINANET.IN_FEATURES = ["p3", "p4"]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32, 40, 50]]
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    assert anchors_per_location(cfg) == [9, 9]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64, 80]]
    assert anchors_per_location(cfg) == [3, 6]


@pytest.mark.parametrize("weighting", ["harmony", "uniform"])
def test_hd_weighting_uniform_ignores_the_harmony_score(retina_teacher_weights, monkeypatch, weighting):
    """With every Harmony Score 0 and negatives off, harmony-weighted HD teaches
    nothing; uniform weights (the ablation of the Harmony Score) still teach every positive."""
    import d2_distill.methods.tbd as tbd

    monkeypatch.setattr(tbd, "harmony_score", lambda s, u, gamma: torch.zeros_like(s))
    model = build(cfg_for("tbd_retinanet.yaml", "DISTILL.TBD.TFD_WEIGHT", "0.0", "DISTILL.TBD.HD_NEG_WEIGHT", "0.0",
                          "DISTILL.TBD.HD_WEIGHTING", weighting, teacher=retina_teacher_weights))
    assert model.method.hd_weighting == weighting
    losses, _ = _step(model, fake_batch(2))
    if weighting == "harmony":
        assert losses["loss_tbd_hd"].item() == 0.0
    else:
        assert losses["loss_tbd_hd"].item() > 0.0


def test_hd_weighting_is_checked(retina_teacher_weights):
    with pytest.raises(ValueError, match=r"DISTILL.TBD.HD_WEIGHTING='equal' is not one of \['harmony', 'uniform'\]"):
        build(cfg_for("tbd_retinanet.yaml", "DISTILL.TBD.HD_WEIGHTING", "equal", teacher=retina_teacher_weights))


def test_recommended_config_is_the_papers_tbd_with_a_stronger_tfd_term(retina_teacher_weights):
    """configs/quickstart/tbd_retinanet.yaml: tbd_retinanet_paper.yaml with only
    DISTILL.TBD.TFD_WEIGHT changed, so its TFD loss is that weight times the paper
    setting's on the same weights and batch, and its HD loss is the same."""
    base, tuned = (cfg_for(c, teacher=retina_teacher_weights) for c in ("tbd_retinanet_paper.yaml", "tbd_retinanet.yaml"))
    assert changed_keys(base, tuned) == {"DISTILL.TBD.TFD_WEIGHT", "OUTPUT_DIR"} and tuned.DISTILL.TBD.TFD_WEIGHT > 1.0
    losses = []
    for cfg in (base, tuned):
        torch.manual_seed(0)  # the same random adapters and student
        losses.append({k: float(v.detach()) for k, v in _step(build(cfg), fake_batch(2))[0].items()})
    (b, t), w = losses, tuned.DISTILL.TBD.TFD_WEIGHT
    assert b["loss_tbd_tfd"] > 0
    assert t["loss_tbd_tfd"] == pytest.approx(w * b["loss_tbd_tfd"], rel=1e-5)
    assert t["loss_tbd_hd"] == pytest.approx(b["loss_tbd_hd"], rel=1e-6)
