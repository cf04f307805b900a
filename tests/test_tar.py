"""TAR through the user's path (quickstart config -> Distiller -> trainer)."""
import pytest
import torch
from detectron2.utils.events import EventStorage

from helpers import cfg_for, changed_keys, fake_batch, qs, train
from trainable import build_trainable as build


def _count_calls(module):
    calls = []
    module.register_forward_pre_hook(lambda m, args: calls.append(args))
    return calls


def _step(model, batch, it=0):
    model.train()
    with EventStorage(it):
        return model(batch)


def test_teacher_box_pooler_gets_exactly_the_students_sampled_boxes(frcnn_teacher_weights):
    model = build(cfg_for("tar_faster_rcnn_paper.yaml", teacher=frcnn_teacher_weights))
    student_calls = _count_calls(model.student.roi_heads.box_pooler)
    teacher_calls = _count_calls(model.teacher.model.roi_heads.box_pooler)
    predictor_calls = _count_calls(model.student.roi_heads.box_predictor)
    losses = _step(model, fake_batch(2))
    assert len(student_calls) == len(teacher_calls) == 1
    assert len(predictor_calls) == 1  # student predictions are recorded, not recomputed
    s_boxes, t_boxes = student_calls[0][1], teacher_calls[0][1]
    assert len(s_boxes) == len(t_boxes) == 2
    for s, t in zip(s_boxes, t_boxes):
        assert len(s) > 0 and torch.equal(s.tensor, t.tensor)
    assert {"loss_tar_feat", "loss_tar_cls", "loss_tar_reg"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize(
    "off, absent",
    [
        (["DISTILL.TAR.FEAT_WEIGHT", "0.0"], "loss_tar_feat"),
        (["DISTILL.TAR.CLS_WEIGHT", "0.0"], "loss_tar_cls"),
        (["DISTILL.TAR.REG_WEIGHT", "0.0"], "loss_tar_reg"),
    ],
)
def test_zero_weight_component_is_not_computed(frcnn_teacher_weights, off, absent):
    model = build(cfg_for("tar_faster_rcnn_paper.yaml", *off, teacher=frcnn_teacher_weights))
    losses = _step(model, fake_batch(2))
    assert absent not in losses
    assert len([k for k in losses if k.startswith("loss_tar_")]) == 2


def test_head_terms_off_never_run_teacher_box_head(frcnn_teacher_weights):
    cfg = cfg_for("tar_faster_rcnn_paper.yaml", "DISTILL.TAR.CLS_WEIGHT", "0.0", "DISTILL.TAR.REG_WEIGHT", "0.0",
                  teacher=frcnn_teacher_weights)
    model = build(cfg)
    box_head_calls = _count_calls(model.teacher.model.roi_heads.box_head)
    pooler_calls = _count_calls(model.teacher.model.roi_heads.box_pooler)
    rpn_calls = _count_calls(model.teacher.model.proposal_generator)
    losses = _step(model, fake_batch(2))
    assert not box_head_calls and not pooler_calls and not rpn_calls
    assert set(k for k in losses if k.startswith("loss_tar")) == {"loss_tar_feat"}
    assert model.method.feature is not None and not model.method.heads_on


def test_all_weights_zero_skips_the_teacher(frcnn_teacher_weights):
    cfg = cfg_for("tar_faster_rcnn_paper.yaml", "DISTILL.TAR.FEAT_WEIGHT", "0.0", "DISTILL.TAR.CLS_WEIGHT", "0.0",
                  "DISTILL.TAR.REG_WEIGHT", "0.0", teacher=frcnn_teacher_weights)
    model = build(cfg)
    backbone_calls = _count_calls(model.teacher.model.backbone)
    losses = _step(model, fake_batch(2))
    assert not backbone_calls and not any(k.startswith("loss_tar") for k in losses)
    assert not list(model.method.parameters())


def test_losses_finite_without_ground_truth(frcnn_teacher_weights):
    model = build(cfg_for("tar_faster_rcnn_paper.yaml", teacher=frcnn_teacher_weights))
    losses = _step(model, fake_batch(2, boxes_per_image=0))
    for k in ("loss_tar_feat", "loss_tar_cls", "loss_tar_reg"):
        assert torch.isfinite(losses[k]) and losses[k] == 0, k
    sum(losses.values()).backward()
    # the adapters stay in the graph (DDP sees them used) even with an all-zero mask
    assert all(p.grad is not None for p in model.method.parameters())


def test_decay_is_the_default_schedule(frcnn_teacher_weights):
    model = build(cfg_for("tar_faster_rcnn_paper.yaml", teacher=frcnn_teacher_weights, iters=4))
    assert model.schedule.kind == "linear"
    assert [model.schedule_factor(t) for t in (0, 2, 4)] == [1.0, 0.5, 0.0]


def test_proposals_both_adds_teacher_proposals(frcnn_teacher_weights, monkeypatch):
    from detectron2.modeling.roi_heads import StandardROIHeads

    seen = []
    original = StandardROIHeads.label_and_sample_proposals

    def spy(self, proposals, targets):
        seen.append([len(p) for p in proposals])
        return original(self, proposals, targets)

    monkeypatch.setattr(StandardROIHeads, "label_and_sample_proposals", spy)  # before the recorder wraps it
    model = build(cfg_for("tar_faster_rcnn_paper.yaml", "DISTILL.TAR.PROPOSALS", "both",
                          "DISTILL.TAR.TEACHER_PROPOSALS_TOPK", "7", teacher=frcnn_teacher_weights))
    rpn_calls = _count_calls(model.teacher.model.proposal_generator)
    student_rpn = []
    model.student.proposal_generator.register_forward_hook(lambda m, i, o: student_rpn.append([len(p) for p in o[0]]))
    losses = _step(model, fake_batch(2))
    assert len(rpn_calls) == 1
    assert seen == [[n + 7 for n in student_rpn[0]]]
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize(
    "opts",
    [
        ["MODEL.MASK_ON", "True"],  # Mask R-CNN student: the mask head trains normally
        ["MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True"],  # class-agnostic box regression
    ],
    ids=["mask_rcnn", "class_agnostic"],
)
@pytest.mark.slow
def test_student_variants_train(frcnn_teacher_weights, tmp_path, opts):
    trainer = train(cfg_for("tar_faster_rcnn_paper.yaml", *opts, teacher=frcnn_teacher_weights, out_dir=tmp_path, iters=2))
    keys = set(trainer.storage.histories())
    assert {"loss_tar_feat", "loss_tar_cls", "loss_tar_reg"} <= keys
    if "MODEL.MASK_ON" in opts:
        assert "loss_mask" in keys
    for k in ("loss_tar_reg", "total_loss"):
        assert all(torch.isfinite(torch.tensor(v)) for v, _ in trainer.storage.history(k).values())


@pytest.mark.parametrize(
    "teacher_opts, message",
    [
        ("['MODEL.ROI_HEADS.NUM_CLASSES', 5]", "MODEL.ROI_HEADS.NUM_CLASSES"),
        ("['MODEL.RPN.IN_FEATURES', ['p2', 'p3', 'p4', 'p5']]", "FPN level names"),
        ("['MODEL.ROI_HEADS.NAME', 'Res5ROIHeads']", "StandardROIHeads"),
    ],
)
def test_mismatched_teacher_fails_at_build(frcnn_teacher_weights, teacher_opts, message):
    cfg = cfg_for("tar_faster_rcnn_paper.yaml", "DISTILL.TEACHER.OPTS", teacher_opts, teacher=frcnn_teacher_weights)
    with pytest.raises(ValueError, match=message):
        build(cfg)


def test_tar_on_retinanet_fails_at_build(retina_teacher_weights):
    cfg = cfg_for("tbd_retinanet.yaml", "DISTILL.METHOD", "TAR", teacher=retina_teacher_weights)
    with pytest.raises(ValueError, match=r"DISTILL.METHOD=TAR serves GeneralizedRCNN detectors; the .* is \'RetinaNet\' \(methods for RetinaNet: FEATURE, PKD, TBD\)"):
        build(cfg)


def test_head_terms_are_normalised_by_all_sampled_rois(frcnn_teacher_weights, monkeypatch):
    """loss_tar_cls / loss_tar_reg = weight * (sum over foreground RoIs) / (all sampled RoIs),
    the normaliser detectron2 uses for loss_cls and loss_box_reg."""
    from d2_distill.methods import tar as tar_module

    seen = {}

    def spy(name):
        fn = getattr(tar_module, name)

        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            seen[name] = (args[0].shape[0], out.detach())  # rows given, their mean
            return out

        monkeypatch.setattr(tar_module, name, wrapped)

    spy("tar_cls_loss")
    spy("tar_reg_loss")
    cfg = cfg_for("tar_faster_rcnn_paper.yaml", "DISTILL.TAR.CLS_GATE", "none", "DISTILL.TAR.REG_GATE", "none",
                  "DISTILL.SCHEDULE.KIND", "constant", "DISTILL.TAR.CLS_WEIGHT", "0.5",
                  "DISTILL.TAR.REG_WEIGHT", "2.0", teacher=frcnn_teacher_weights)
    model = build(cfg)
    sampled = []
    model.student.roi_heads.box_predictor.register_forward_hook(lambda m, i, o: sampled.append(i[0].shape[0]))
    losses = _step(model, fake_batch(2, boxes_per_image=3))
    (n_cls, mean_cls), (n_reg, mean_reg) = seen["tar_cls_loss"], seen["tar_reg_loss"]
    assert sampled and 0 < n_cls == n_reg < sampled[0]  # foreground RoIs only, fewer than sampled
    assert mean_cls > 0 and mean_reg > 0  # ungated: every foreground RoI counts
    assert losses["loss_tar_cls"].item() == pytest.approx(0.5 * mean_cls.item() * n_cls / sampled[0], rel=1e-5)
    assert losses["loss_tar_reg"].item() == pytest.approx(2.0 * mean_reg.item() * n_reg / sampled[0], rel=1e-5)


def test_recommended_config_distils_two_adaptive_levels(frcnn_teacher_weights):
    """configs/quickstart/tar_faster_rcnn.yaml: the gated, standardised feature level
    and the classification term on shared proposals, no regression term; the
    teacher's box head runs once for both (the gate and the KL)."""
    model = build(cfg_for("tar_faster_rcnn.yaml", teacher=frcnn_teacher_weights))
    box_head_calls = _count_calls(model.teacher.model.roi_heads.box_head)
    losses = _step(model, fake_batch(2))
    assert set(k for k in losses if k.startswith("loss_tar")) == {"loss_tar_feat", "loss_tar_cls"}
    assert len(box_head_calls) == 1 and model.method.feature is not None
    assert (model.method.feat_gate, model.method.feat_distance) == ("cls", "standardized")
    assert all(torch.isfinite(v) for v in losses.values())


def test_recommended_config_differs_from_the_papers_defaults_only_in_tar_options(frcnn_teacher_weights, monkeypatch):
    """tar_faster_rcnn.yaml against tar_faster_rcnn_paper.yaml (every DISTILL.TAR option
    at its default): only TAR's options and the decay differ, and the KL term is
    computed at the recommended temperature."""
    import d2_distill.methods.tar as tar_module

    paper, tuned = (cfg_for(c, teacher=frcnn_teacher_weights) for c in ("tar_faster_rcnn_paper.yaml",
                                                                           "tar_faster_rcnn.yaml"))
    assert changed_keys(paper, tuned) == {"DISTILL.TAR.FEAT_WEIGHT", "DISTILL.TAR.FEAT_GATE", "DISTILL.TAR.FEAT_DISTANCE",
                                          "DISTILL.TAR.REG_WEIGHT", "DISTILL.TAR.TEMPERATURE",
                                          "DISTILL.SCHEDULE.KIND", "DISTILL.SCHEDULE.ITERS_PER_EPOCH", "OUTPUT_DIR"}
    from d2_distill.engine import setup_cfg

    assert paper.DISTILL.TAR == setup_cfg("").DISTILL.TAR  # the paper config: every default
    seen = []
    real = tar_module.tar_cls_loss

    def recording(student_logits, teacher_logits, gate, temperature=1.0):
        seen.append(temperature)
        return real(student_logits, teacher_logits, gate, temperature)

    monkeypatch.setattr(tar_module, "tar_cls_loss", recording)
    for cfg in (paper, tuned):
        _step(build(cfg), fake_batch(2))
    assert seen == [1.0, tuned.DISTILL.TAR.TEMPERATURE] and seen[1] > 1.0


def test_recommended_config_decays_per_epoch_of_the_training_split():
    """The paper's per-epoch decay, its epoch length matching the config's own
    training split and batch (a changed dataset or batch must update the config)."""
    import math

    from d2_distill.data import SPLITS
    from d2_distill.engine import setup_cfg
    from d2_distill.modeling.distiller import build_schedule

    cfg = setup_cfg(qs("tar_faster_rcnn.yaml"))
    schedule = build_schedule(cfg)
    images = sum(SPLITS[name]["num_images"] for name in cfg.DATASETS.TRAIN)
    assert schedule.kind == "step" and schedule.iters_per_epoch == math.ceil(images / cfg.SOLVER.IMS_PER_BATCH)
    e = schedule.iters_per_epoch
    assert schedule(0) == schedule(e - 1) == 1.0 and schedule(e) < 1.0
