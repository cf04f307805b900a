"""TAR's adaptive options beyond the paper's text (per-object feature gate,
standardised feature distance, teacher-bounded regression) and the loss-scale
diagnostics: the pure functions against hand-computed values, then the same
options through the user's path (quickstart config -> Distiller)."""
import math

import pytest
import torch
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from d2_distill.losses import (
    feature_imitation_loss,
    gaussian_mask,
    masked_standardize,
    tar_bounded_reg_loss,
    tar_object_gate,
)
from d2_distill.methods.tar import _roi_objects
from d2_distill.modeling import diagnostics
from d2_distill.modeling.diagnostics import gradient_ratios, student_parts
from helpers import cfg_for, fake_batch
from trainable import build_trainable as build


def t(x, **kw):
    return torch.tensor(x, dtype=kw.pop("dtype", torch.float32), **kw)


# --------------------------------------------------------------------------- #
# pure functions
# --------------------------------------------------------------------------- #
def test_gaussian_mask_weights_gate_each_box():
    boxes = t([[0, 0, 8, 8], [8, 8, 16, 16]])
    g1 = gaussian_mask(boxes[:1], 4, 4, 4)
    g2 = gaussian_mask(boxes[1:], 4, 4, 4)
    assert torch.allclose(gaussian_mask(boxes, 4, 4, 4, weights=t([1.0, 0.0])), g1)
    assert torch.allclose(gaussian_mask(boxes, 4, 4, 4, weights=t([0.0, 1.0])), g2)
    assert torch.allclose(gaussian_mask(boxes, 4, 4, 4, weights=t([0.5, 1.0])), torch.maximum(0.5 * g1, g2))
    assert torch.equal(gaussian_mask(boxes, 4, 4, 4, weights=t([1.0, 1.0])), gaussian_mask(boxes, 4, 4, 4))
    # cell (0, 0) has its centre (2, 2): box 1 centre (4, 4), sigma 2 -> exp(-(4/8 + 4/8))
    assert math.isclose(float(g1[0, 0]), math.exp(-1.0), rel_tol=1e-6)
    with pytest.raises(ValueError, match=r"weights must have shape \(2,\)"):
        gaussian_mask(boxes, 4, 4, 4, weights=t([1.0]))


def test_masked_standardize_by_hand():
    x = t([1.0, 3.0, 100.0]).view(1, 1, 1, 3)
    m = t([1.0, 1.0, 0.0]).view(1, 1, 3)
    out = masked_standardize(x, m, eps=0.0)
    # inside the mask: mean 2, variance 1; the masked-out cell follows the same affine map
    assert torch.allclose(out.view(-1), t([-1.0, 1.0, 98.0]))
    # an all-zero mask: mean 0, variance 0 -> x / sqrt(eps), finite
    assert torch.isfinite(masked_standardize(x, torch.zeros(1, 1, 3), eps=1e-6)).all()


def test_standardized_imitation_ignores_channel_scale_and_shift():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 4, 5, generator=g, requires_grad=True)
    tt = torch.randn(2, 3, 4, 5, generator=g)
    m = torch.rand(2, 4, 5, generator=g)
    scaled = tt * t([2.0, 0.5, 7.0]).view(1, 3, 1, 1) + t([1.0, -3.0, 0.0]).view(1, 3, 1, 1)
    a = feature_imitation_loss([s], [tt], [m], standardize=True)
    b = feature_imitation_loss([s], [scaled], [m], standardize=True)
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(feature_imitation_loss([s], [tt], [m]), feature_imitation_loss([s], [scaled], [m]))
    same = feature_imitation_loss([tt * 3 + 1], [tt], [m], standardize=True)
    assert float(same) < 1e-8
    a.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


@pytest.mark.parametrize("standardize", [False, True])
def test_imitation_under_autocast_keeps_float32(standardize):
    """Under bfloat16 autocast (SOLVER.AMP.ENABLED) the loss's batched reductions
    still run in float32: the same value as outside autocast."""
    g = torch.Generator().manual_seed(1)
    s = [torch.randn(2, 8, 16, 16, generator=g), torch.randn(2, 8, 8, 8, generator=g)]
    tt = [x + 0.3 * torch.randn(x.shape, generator=g) for x in s]
    m = [torch.rand(2, 16, 16, generator=g), torch.rand(2, 8, 8, generator=g)]
    ref = feature_imitation_loss(s, tt, m, standardize=standardize)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = feature_imitation_loss(s, tt, m, standardize=standardize)
    assert got.dtype == torch.float32 and torch.allclose(got, ref, rtol=1e-6, atol=0)


def test_tar_object_gate_by_hand():
    teacher = t([0.9, 0.5, 0.2, 0.3, 0.4])
    student = t([0.5, 0.6, 0.1, 0.9, 0.4])
    objects = torch.tensor([0, 0, 1, -1, 3])
    # object 0: mean 0.7 vs 0.55 -> open; 1: 0.2 vs 0.1 -> open; 2: no RoI -> `empty`;
    # 3: a tie -> closed; the background RoI (-1) counts for no object
    assert tar_object_gate(teacher, student, objects, 4).tolist() == [True, True, True, False]
    assert tar_object_gate(teacher, student, objects, 4, empty=False).tolist() == [True, True, False, False]
    assert tar_object_gate(t([]), t([]), torch.zeros(0, dtype=torch.long), 0).shape == (0,)


def test_tar_bounded_reg_loss_by_hand():
    ds = t([[1.0, 0, 0, 0], [0.0, 0, 0, 0], [0.5, 0, 0, -0.5]], requires_grad=True)
    dt = t([[0.5, 0, 0, 0], [2.0, 0, 0, 0], [0.0, 0, 0, 0]])
    gt = torch.zeros(3, 4)
    gate = torch.tensor([True, True, False])
    # L1 (beta 0): e_S = [1, 0, 1], e_T = [0.5, 2, 0]; open where e_S > e_T and gated: row 0
    loss = tar_bounded_reg_loss(ds, dt, gt, gate, 0.0)
    assert math.isclose(float(loss.detach()), 1.0 / 3, rel_tol=1e-6)
    loss.backward()
    expected = torch.zeros(3, 4)
    expected[0, 0] = 1.0 / 3  # the gradient pulls towards the ground truth, not the teacher
    assert torch.allclose(ds.grad, expected)
    # a margin opens row 1 too (0 + 3 > 2), whose own error is 0
    assert math.isclose(float(tar_bounded_reg_loss(ds, dt, gt, gate, 0.0, margin=3.0).detach()), 1.0 / 3, rel_tol=1e-6)
    # smooth L1, beta 1: row 0 error 0.5 * 1 = 0.5 vs teacher 0.125 -> open
    assert math.isclose(float(tar_bounded_reg_loss(ds, dt, gt, gate, 1.0).detach()), 0.5 / 3, rel_tol=1e-6)
    loss2, counted = tar_bounded_reg_loss(ds, dt, gt, gate, 0.0, return_open=True)
    assert torch.equal(loss2, loss) and counted.tolist() == [True, False, False]
    with pytest.raises(ValueError, match="same shape"):
        tar_bounded_reg_loss(ds, dt, gt[:, :2], gate, 0.0)


def test_roi_objects_finds_each_rois_ground_truth():
    gt = Instances((64, 64), gt_boxes=Boxes(t([[0, 0, 10, 10], [20, 20, 40, 40]])),
                   gt_classes=torch.tensor([3, 1]))
    sampled = Instances((64, 64), proposal_boxes=Boxes(torch.zeros(4, 4)),
                        gt_boxes=Boxes(t([[20, 20, 40, 40], [0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 40, 40]])),
                        gt_classes=torch.tensor([1, 3, 6, 1]))  # row 2: background (class 6 of 6)
    empty = Instances((64, 64), gt_boxes=Boxes(torch.zeros(0, 4)), gt_classes=torch.zeros(0, dtype=torch.long))
    sampled_empty = Instances((64, 64), proposal_boxes=Boxes(torch.zeros(2, 4)),
                              gt_classes=torch.tensor([6, 6]))
    # the second image's object indices start after the first image's two objects
    out = _roi_objects([sampled, sampled_empty, sampled], [gt, empty, gt], num_classes=6)
    assert out.tolist() == [1, 0, -1, 1, -1, -1, 3, 2, -1, 3]


# --------------------------------------------------------------------------- #
# diagnostics
# --------------------------------------------------------------------------- #
def test_gradient_ratios_by_hand():
    a = torch.nn.Parameter(t([1.0, 2.0]))
    b = torch.nn.Parameter(t([1.0]))
    det = 3 * a.sum() + 4 * b.sum()  # grad a: (3, 3) norm 3*sqrt(2); grad b: 4
    distill = {"loss_x": 6 * a[0], "loss_y": b.sum() * 2, "loss_const": t(1.0)}
    r = gradient_ratios(det, distill, {"p": [a], "q": [b]})
    assert math.isclose(r["loss_x/p"], 6 / (3 * math.sqrt(2)), rel_tol=1e-6)
    assert r["loss_x/q"] == 0.0 and r["loss_y/p"] == 0.0
    assert math.isclose(r["loss_y/q"], 0.5, rel_tol=1e-6)
    assert not any(k.startswith("loss_const") for k in r)  # no graph: nothing to measure


def test_student_parts_are_the_backbone_and_the_box_head(frcnn_teacher_weights):
    model = build(cfg_for("tar_faster_rcnn_paper.yaml", teacher=frcnn_teacher_weights))
    parts = student_parts(model.student)
    ids = {k: {id(p) for p in v} for k, v in parts.items()}
    heads = model.student.roi_heads
    assert ids["backbone"] == {id(p) for p in model.student.backbone.parameters()}
    assert ids["box_head"] == {id(p) for m in (heads.box_head, heads.box_predictor) for p in m.parameters()}
    assert set(parts) == {"backbone", "box_head"}


def _ratios_logged(model, it=0):
    model.train()
    with EventStorage(it) as storage:
        model(fake_batch(2))
        return {k[len("distill/grad_ratio/"):]: v[0] for k, v in storage.latest().items()
                if k.startswith("distill/grad_ratio/")}


def test_grad_ratios_are_logged_on_the_right_parts(frcnn_teacher_weights):
    # gates open, student seeded: with two random detectors an adaptive gate may
    # close on every RoI (the term is then exactly 0), which depends on test order
    torch.manual_seed(0)
    model = build(cfg_for("tar_faster_rcnn_paper.yaml", "DISTILL.DIAGNOSTICS.GRAD_PERIOD", "5",
                          "DISTILL.TAR.CLS_GATE", "none", "DISTILL.TAR.REG_GATE", "none",
                          teacher=frcnn_teacher_weights, iters=100))  # r(10) = 0.9
    ratios = _ratios_logged(model, it=10)
    assert set(ratios) == {f"loss_tar_{x}/{p}" for x in ("feat", "cls", "reg") for p in ("backbone", "box_head")}
    # the feature term only reaches the backbone (through the adapter); the head terms both
    assert ratios["loss_tar_feat/backbone"] > 0 and ratios["loss_tar_feat/box_head"] == 0
    assert ratios["loss_tar_cls/box_head"] > 0 and ratios["loss_tar_cls/backbone"] > 0
    assert ratios["loss_tar_reg/box_head"] > 0 and ratios["loss_tar_reg/backbone"] > 0
    assert _ratios_logged(model, it=11) == {}  # not a multiple of the period


def test_grad_ratios_off_computes_nothing(frcnn_teacher_weights, monkeypatch):
    model = build(cfg_for("tar_faster_rcnn_paper.yaml", teacher=frcnn_teacher_weights))
    assert model.grad_period == 0

    def fail(*args, **kwargs):
        raise AssertionError("gradient ratios computed with GRAD_PERIOD 0")

    monkeypatch.setattr(diagnostics, "gradient_norm", fail)
    assert _ratios_logged(model, it=0) == {}


def test_grad_period_negative_is_a_config_error(frcnn_teacher_weights):
    with pytest.raises(ValueError, match=r"DISTILL.DIAGNOSTICS.GRAD_PERIOD=-1 must be >= 0"):
        build(cfg_for("tar_faster_rcnn_paper.yaml", "DISTILL.DIAGNOSTICS.GRAD_PERIOD", "-1",
                      teacher=frcnn_teacher_weights))


# --------------------------------------------------------------------------- #
# the options through the user's path
# --------------------------------------------------------------------------- #
def _calls(module):
    calls = []
    module.register_forward_pre_hook(lambda m, args: calls.append(1))
    return calls


@pytest.mark.parametrize("gate", ["cls", "iou"])
def test_feature_gate_runs_the_teacher_box_head_and_logs_its_rate(frcnn_teacher_weights, gate):
    model = build(cfg_for("tar_faster_rcnn_paper.yaml", "DISTILL.TAR.FEAT_GATE", gate, "DISTILL.TAR.CLS_WEIGHT", "0.0",
                          "DISTILL.TAR.REG_WEIGHT", "0.0", "DISTILL.TAR.FEAT_DISTANCE", "standardized",
                          teacher=frcnn_teacher_weights))
    box_head = _calls(model.teacher.model.roi_heads.box_head)
    model.train()
    with EventStorage(0) as storage:
        losses = model(fake_batch(2))
        rate = storage.latest()["distill/tar_feat_gate_rate"][0]
    assert box_head == [1]
    assert set(k for k in losses if k.startswith("loss_tar")) == {"loss_tar_feat"}
    assert torch.isfinite(losses["loss_tar_feat"]) and 0.0 <= rate <= 1.0
    with EventStorage(1):
        no_boxes = model(fake_batch(2, boxes_per_image=0))
    assert no_boxes["loss_tar_feat"] == 0


def test_closed_feature_gate_removes_the_feature_loss(frcnn_teacher_weights, monkeypatch):
    """With every object's gate closed the masks are zero, so the term is exactly 0."""
    import d2_distill.methods.tar as tar

    model = build(cfg_for("tar_faster_rcnn_paper.yaml", "DISTILL.TAR.FEAT_GATE", "cls", teacher=frcnn_teacher_weights))
    model.train()
    with EventStorage(0):
        assert model(fake_batch(2))["loss_tar_feat"] > 0
    monkeypatch.setattr(tar, "tar_object_gate", lambda ts, ss, objects, k: torch.zeros(k, dtype=torch.bool))
    with EventStorage(0):
        assert model(fake_batch(2))["loss_tar_feat"] == 0


def test_bounded_regression_through_the_model(frcnn_teacher_weights):
    opts = ["DISTILL.TAR.FEAT_WEIGHT", "0.0", "DISTILL.TAR.CLS_WEIGHT", "0.0", "DISTILL.TAR.REG_GATE", "none"]
    model = build(cfg_for("tar_faster_rcnn_paper.yaml", *opts, "DISTILL.TAR.REG_LOSS", "bounded",
                          teacher=frcnn_teacher_weights))
    model.train()
    torch.manual_seed(0)
    with EventStorage(0) as storage:
        bounded = model(fake_batch(2))["loss_tar_reg"]
        assert 0.0 <= storage.latest()["distill/tar_reg_bound_rate"][0] <= 1.0
    # with a margin larger than any error every RoI is open: the student's whole GT error
    model.method.reg_bound_margin = 1e9
    torch.manual_seed(0)
    with EventStorage(0):
        everything = model(fake_batch(2))
    assert torch.isfinite(bounded) and 0 <= float(bounded.detach()) <= float(everything["loss_tar_reg"].detach())
    # ... which is detectron2's own box loss on the foreground RoIs (same normaliser, same beta)
    assert torch.allclose(everything["loss_tar_reg"], everything["loss_box_reg"], rtol=1e-4)


def test_unknown_option_values_are_config_errors(frcnn_teacher_weights):
    for key, bad, valid in (("FEAT_GATE", "box", "'none', 'cls', 'iou'"),
                            ("FEAT_DISTANCE", "cosine", "'l2', 'standardized'"),
                            ("REG_LOSS", "l2", "'teacher', 'bounded'")):
        with pytest.raises(ValueError, match=f"DISTILL.TAR.{key}='{bad}' is not one of \\[{valid}\\]"):
            build(cfg_for("tar_faster_rcnn_paper.yaml", f"DISTILL.TAR.{key}", bad, teacher=frcnn_teacher_weights))


@pytest.mark.parametrize("period, logged", [(3, {3: True, 4: False, 6: True}), (0, {0: False, 3: False})])
def test_log_period_sets_how_often_methods_log(frcnn_teacher_weights, period, logged):
    model = build(cfg_for("tar_faster_rcnn_paper.yaml", "DISTILL.LOG_PERIOD", str(period),
                          teacher=frcnn_teacher_weights, iters=100))
    model.train()
    for it, expected in logged.items():
        with EventStorage(it) as storage:
            model(fake_batch(2))
            assert ("distill/tar_cls_gate_rate" in storage.latest()) == expected, it


def test_gaussian_masks_of_a_batch_equal_each_image_to_the_bit():
    """The batched masks (images padded to the largest object count) are the
    one-image masks exactly, with and without per-object weights, images without
    objects included."""
    from d2_distill.losses import gaussian_masks

    g = torch.Generator().manual_seed(0)

    def boxes(k):
        xy = torch.rand(k, 2, generator=g) * 100
        return torch.cat([xy, xy + 4 + torch.rand(k, 2, generator=g) * 60], dim=1)

    per_image = [boxes(3), boxes(0), boxes(5), boxes(1)]
    weights = [torch.rand(len(b), generator=g) for b in per_image]
    for h, w, stride in ((32, 40, 4), (4, 5, 32), (1, 1, 128)):
        batch = gaussian_masks(per_image, h, w, stride, 0.25)
        gated = gaussian_masks(per_image, h, w, stride, 0.25, weights=weights)
        assert batch.shape == gated.shape == (4, h, w)
        for i, (b, wt) in enumerate(zip(per_image, weights)):
            assert torch.equal(batch[i], gaussian_mask(b, h, w, stride, 0.25))
            assert torch.equal(gated[i], gaussian_mask(b, h, w, stride, 0.25, weights=wt))
        assert not batch[1].any() and batch[0].max() > 0
    assert gaussian_masks([boxes(0), boxes(0)], 3, 3, 4).shape == (2, 3, 3)
