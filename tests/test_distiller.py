"""The distillation framework, through the user's path: config -> build_model ->
DistillTrainer -> checkpoints."""
import copy
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.events import EventStorage

from d2_distill.engine import DistillCheckpointer, DistillTrainer, setup_cfg
from d2_distill.modeling import Distiller
from d2_distill.modeling.teacher import resolve_config_file

from helpers import Interrupt, ROOT, cfg_for, fake_batch, train
from trainable import build_trainable as build

FEATURE_OPTS = ("DISTILL.METHOD", "FEATURE")


def test_strict_teacher_loading_rejects_renamed_key(frcnn_teacher_weights, tmp_path):
    state = torch.load(frcnn_teacher_weights, map_location="cpu", weights_only=True)
    key = "roi_heads.box_predictor.cls_score.weight"
    state["model"]["roi_heads.box_predictor.cls_score.renamed"] = state["model"].pop(key)
    bad = tmp_path / "renamed.pth"
    torch.save(state, bad)
    cfg = cfg_for("tar_faster_rcnn_paper.yaml", *FEATURE_OPTS, teacher=str(bad))
    with pytest.raises(RuntimeError) as e:
        build(cfg)
    msg = str(e.value)
    assert key in msg and "roi_heads.box_predictor.cls_score.renamed" in msg
    assert str(bad) in msg and "faster_rcnn_R34_FPN_teacher.yaml" in msg


def test_missing_teacher_weights_fail_before_building(tmp_path):
    cfg = cfg_for("tar_faster_rcnn_paper.yaml", teacher=str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build(cfg)
    with pytest.raises(ValueError, match="DISTILL.TEACHER.WEIGHTS is empty"):
        build(cfg_for("tar_faster_rcnn_paper.yaml", "DISTILL.TEACHER.WEIGHTS", ""))


def test_teacher_is_not_state_parameters_or_saved(frcnn_teacher_weights, tmp_path):
    model = build(cfg_for("tar_faster_rcnn_paper.yaml", *FEATURE_OPTS, teacher=frcnn_teacher_weights))
    keys = set(model.state_dict())
    assert keys and all(k.startswith(("student.", "method.")) for k in keys)
    teacher_params = {id(p) for p in model.teacher.parameters()}
    assert not teacher_params & {id(p) for p in model.parameters()}
    DistillCheckpointer(model, save_dir=str(tmp_path)).save("ckpt")
    saved = torch.load(tmp_path / "ckpt.pth", map_location="cpu", weights_only=True)["model"]
    assert set(saved) == keys


@pytest.mark.slow
def test_training_freezes_teacher_and_trains_adapters(frcnn_teacher_weights, tmp_path):
    cfg = cfg_for("tar_faster_rcnn_paper.yaml", *FEATURE_OPTS, teacher=frcnn_teacher_weights, out_dir=tmp_path, iters=3)
    trainer = train(cfg)
    model = trainer.model
    teacher = model.teacher
    assert not teacher.training and not teacher.model.training  # model.train() did not reach it
    reference = torch.load(frcnn_teacher_weights, map_location="cpu", weights_only=True)["model"]
    for k, v in teacher.model.state_dict().items():
        assert torch.equal(v, reference[k]), k
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    adapters = list(model.method.features.adapters.parameters())
    assert adapters and all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters)
    hist = trainer.storage.history("loss_feat").values()
    assert len(hist) == 3 and all(torch.isfinite(torch.tensor(v)) for v, _ in hist)


def test_eval_output_is_the_students(frcnn_teacher_weights):
    model = build(cfg_for("tar_faster_rcnn_paper.yaml", *FEATURE_OPTS, teacher=frcnn_teacher_weights))
    model.eval()
    batch = [{k: v for k, v in x.items() if k != "instances"} for x in fake_batch(2)]
    with torch.no_grad():
        ours = model(batch)
        theirs = model.student(batch)
    for a, b in zip(ours, theirs):
        assert torch.equal(a["instances"].pred_boxes.tensor, b["instances"].pred_boxes.tensor)
        assert torch.equal(a["instances"].scores, b["instances"].scores)


def test_input_normalisation_and_format_per_model(frcnn_teacher_weights):
    """Teacher and student normalise the same image with their own mean/std/format."""
    cfg = cfg_for(
        "tar_faster_rcnn_paper.yaml", *FEATURE_OPTS,
        "DISTILL.TEACHER.OPTS", "['INPUT.FORMAT', 'RGB', 'MODEL.PIXEL_MEAN', '[10.0, 20.0, 30.0]']",
        teacher=frcnn_teacher_weights,
    )
    model = build(cfg)
    batch = fake_batch(1)
    images = model.teacher.preprocess(batch, "BGR", 32)
    img = batch[0]["image"]
    expected = (img.flip(0) - torch.tensor([10.0, 20.0, 30.0]).view(3, 1, 1)) / 64.0
    assert torch.allclose(images.tensor[0, :, :128, :128], expected)


def test_model_weights_initialise_the_student(frcnn_teacher_weights, tmp_path):
    """A plain detectron2 checkpoint in MODEL.WEIGHTS initialises the student as vanilla detectron2 would."""
    plain = build(cfg_for("faster_rcnn_R18_FPN_student.yaml"))
    DetectionCheckpointer(plain, save_dir=str(tmp_path)).save("student_init")
    cfg = cfg_for(
        "tar_faster_rcnn_paper.yaml", *FEATURE_OPTS, "MODEL.WEIGHTS", str(tmp_path / "student_init.pth"),
        teacher=frcnn_teacher_weights, out_dir=tmp_path / "run",
    )
    trainer = DistillTrainer(cfg)  # only loading is tested: no training
    trainer.resume_or_load(resume=False)
    student = trainer.model.student.state_dict()
    for k, v in plain.state_dict().items():
        assert torch.equal(student[k], v), k


@pytest.mark.slow
def test_resume_continues_schedule(frcnn_teacher_weights, tmp_path):
    cfg = cfg_for(
        "tar_faster_rcnn_paper.yaml", "SOLVER.CHECKPOINT_PERIOD", "2", *FEATURE_OPTS, "DISTILL.SCHEDULE.KIND", "linear",
        teacher=frcnn_teacher_weights, out_dir=tmp_path, iters=4,
    )
    first = DistillTrainer(cfg)
    first.register_hooks([Interrupt(at=1)])
    first.resume_or_load(resume=False)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert (tmp_path / "model_0000001.pth").is_file() and not (tmp_path / "model_final.pth").exists()
    assert [it for _, it in first.storage.history("distill/schedule_factor").values()] == [0, 1]

    resumed = train(cfg, resume=True)  # what `train_net.py --resume` does
    hist = resumed.storage.history("distill/schedule_factor").values()
    assert [it for _, it in hist] == [2, 3]
    assert [v for v, _ in hist] == pytest.approx([1 - 2 / 4, 1 - 3 / 4])
    assert torch.load(tmp_path / "model_final.pth", weights_only=True)["iteration"] == 3


def test_schedule_factor_scales_losses(frcnn_teacher_weights):
    cfg = cfg_for("tar_faster_rcnn_paper.yaml", *FEATURE_OPTS, teacher=frcnn_teacher_weights, iters=10)
    model = build(cfg)
    model.train()
    torch.manual_seed(0)
    batch = fake_batch(2)
    out = {}
    for it in (0, 5, 10):
        torch.manual_seed(0)
        with EventStorage(it):
            out[it] = model(copy.deepcopy(batch))["loss_feat"].item()
    assert out[0] > 0
    assert out[5] == pytest.approx(0.5 * out[0], rel=1e-4)
    assert out[10] == 0


@pytest.mark.slow
def test_model_zoo_configs_one_iteration(tmp_path):
    """Teacher R101-FPN 3x, student R50-FPN 1x (the model-zoo settings of the COCO
    config); random weights, small input, one iteration on CPU."""
    from conftest import make_random_checkpoint

    coco = os.path.join(ROOT, "configs", "COCO", "tar_faster_rcnn_R50_from_R101.yaml")
    teacher = make_random_checkpoint(resolve_config_file("COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml"),
                                     str(tmp_path / "t"))
    small = ["INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MAX_SIZE_TRAIN", "160", "SOLVER.IMS_PER_BATCH", "1"]
    cfg = setup_cfg(coco, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "DISTILL.TEACHER.WEIGHTS", teacher, *small])
    model = build(cfg)
    model.train()
    with EventStorage(0):
        losses = model(fake_batch(1, size=160))
    total = sum(losses.values())
    total.backward()
    assert {"loss_tar_feat", "loss_tar_cls", "loss_tar_reg", "loss_cls"} <= set(losses)
    assert torch.isfinite(total)
    assert isinstance(model, Distiller)
    assert model.student.backbone.bottom_up.stages[-1][0].conv1.weight.shape[1] == 1024  # R50 res5 input
    assert len(model.teacher.model.backbone.bottom_up.res4) == 23  # R101
