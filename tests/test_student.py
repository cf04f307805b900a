"""The student without the teacher: d2_distill.student, evaluation and export
with the teacher's files absent (and the teacher never built), distiller
checkpoints in plain student models, the teacher-less training error, and
NaN/Inf teachers refused at load."""
import importlib.util
import logging
import os

import numpy as np
import pytest
import torch
from detectron2.engine import DefaultPredictor, default_argument_parser
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import d2_distill.modeling.teacher as teacher_module
from d2_distill.engine import DistillCheckpointer, DistillTrainer
from d2_distill.export import export_student
from d2_distill.modeling import Distiller
from d2_distill.student import (
    STUDENT_PREFIX,
    is_distiller_state,
    student_cfg,
    student_inputs,
    student_state_dict,
    vanilla_student_cfg,
)

from helpers import ROOT, SMALL, cfg_for, fake_batch, qs
from trainable import build_trainable

ABSENT = ["DISTILL.TEACHER.WEIGHTS", "/no/such/teacher.pth", "DISTILL.TEACHER.CONFIG_FILE", "no/such/teacher.yaml"]


def _train_net():
    spec = importlib.util.spec_from_file_location("train_net", os.path.join(ROOT, "train_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_teacher(monkeypatch):
    """Any attempt to build or load a teacher fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was built or loaded")

    monkeypatch.setattr(teacher_module.FrozenTeacher, "__init__", refuse)
    monkeypatch.setattr(teacher_module.StrictTeacherCheckpointer, "load_strict", refuse)
    monkeypatch.setattr(teacher_module, "load_teacher_cfg", refuse)
    import d2_distill.modeling.distiller as distiller_module

    monkeypatch.setattr(distiller_module, "load_teacher_cfg", refuse)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, frcnn_teacher_weights):
    """A TAR distiller (perturbed student, adapters) saved as a distiller checkpoint."""
    model = build_trainable(cfg_for("tar_faster_rcnn_paper.yaml", teacher=frcnn_teacher_weights))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("distilled")
    DistillCheckpointer(model, save_dir=str(out)).save("model_final")
    return model, str(out / "model_final.pth")


def _image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (128, 160, 3), dtype=np.uint8)


def _same_predictions(a, b):
    assert len(a) == len(b)
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.equal(a.scores, b.scores)


# ---- d2_distill.student ------------------------------------------------------------
def test_student_module_knows_the_student():
    cfg = cfg_for("tbd_retinanet.yaml")
    scfg = student_cfg(cfg)
    assert scfg.MODEL.META_ARCHITECTURE == "RetinaNet" and scfg.is_frozen()
    assert cfg.MODEL.META_ARCHITECTURE == "Distiller"  # the distiller config is untouched
    plain = cfg_for("retinanet_R18_FPN_student.yaml")
    assert student_cfg(plain) is plain
    vanilla = vanilla_student_cfg(cfg, "/x/model_final.pth")
    assert "DISTILL" not in vanilla and vanilla.MODEL.WEIGHTS == "/x/model_final.pth"
    with pytest.raises(ValueError, match="not a Distiller config"):
        vanilla_student_cfg(plain)

    state = {STUDENT_PREFIX + "a.weight": 1, "method.adapters.p3.weight": 2}
    assert is_distiller_state(state) and not is_distiller_state({"a.weight": 1})
    assert student_state_dict(state) == {"a.weight": 1}
    assert student_state_dict({"a.weight": 1}) == {}

    inputs = student_inputs(cfg, _image())
    assert inputs["height"] == 128 and inputs["width"] == 160  # the original size; resized to MAX_SIZE_TEST 128
    assert inputs["image"].shape == (3, 102, 128) and inputs["image"].dtype == torch.float32


# ---- evaluation and export without the teacher -----------------------------------------
def test_build_model_builds_the_student_only(no_teacher):
    model = build_model(cfg_for("tar_faster_rcnn_paper.yaml", *ABSENT))
    assert isinstance(model, Distiller)
    assert model.teacher is None and model.method is None
    assert all(k.startswith(STUDENT_PREFIX) for k in model.state_dict())


def test_eval_only_without_teacher(distilled, tmp_path, no_teacher):
    model, ckpt = distilled
    opts = SMALL + ["OUTPUT_DIR", str(tmp_path), "MODEL.WEIGHTS", ckpt, *ABSENT]
    args = default_argument_parser().parse_args(["--config-file", qs("tar_faster_rcnn_paper.yaml"), "--eval-only", *opts])
    results = _train_net().main(args)
    assert {"AP", "AP50"} <= set(results["bbox"])


def test_default_predictor_without_teacher(distilled, no_teacher, caplog):
    model, ckpt = distilled
    cfg = cfg_for("tar_faster_rcnn_paper.yaml", "MODEL.WEIGHTS", ckpt, *ABSENT)
    with caplog.at_level(logging.INFO):
        predictor = DefaultPredictor(cfg)
    # method.* (the adapters) are ignored quietly: one info line, no incompatible-keys warnings
    assert "ignored" in caplog.text and "method." in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "checkpoint" in r.getMessage()]
    image = _image()
    ours = predictor(image)["instances"]
    model.eval()
    with torch.no_grad():
        theirs = model.student([student_inputs(cfg, image)])[0]["instances"]
    _same_predictions(ours, theirs)


def test_export_without_teacher(distilled, tmp_path, no_teacher):
    model, ckpt = distilled
    weights, _ = export_student(qs("tar_faster_rcnn_paper.yaml"), ckpt, str(tmp_path), SMALL + ABSENT)
    exported = torch.load(weights, map_location="cpu", weights_only=True)["model"]
    student = model.student.state_dict()
    assert set(exported) == set(student)
    assert all(torch.equal(exported[k], v) for k, v in student.items())


@pytest.mark.slow
def test_eval_teacher_loads_the_teacher_only_when_asked(distilled, tmp_path, frcnn_teacher_weights, monkeypatch):
    train_net = _train_net()
    built = []
    original = train_net.build_teacher
    monkeypatch.setattr(train_net, "build_teacher", lambda cfg: built.append(1) or original(cfg))
    _, ckpt = distilled
    base = ["--config-file", qs("tar_faster_rcnn_paper.yaml"), "--eval-only", *SMALL, "OUTPUT_DIR", str(tmp_path),
            "MODEL.WEIGHTS", ckpt, "DISTILL.TEACHER.WEIGHTS", frcnn_teacher_weights]
    results = train_net.main(default_argument_parser().parse_args(base + ["DISTILL.EVAL.TEACHER", "True"]))
    assert set(results) == {"student", "teacher"} and built == [1]


# ---- distiller checkpoints and plain models ----------------------------------------------
def test_distiller_checkpoint_loads_into_a_plain_student(distilled, caplog):
    model, ckpt = distilled
    plain = build_model(cfg_for("faster_rcnn_R18_FPN_student.yaml"))
    with caplog.at_level(logging.INFO):
        DistillCheckpointer(plain).load(ckpt)
    assert "distiller's: loading its student" in caplog.text
    theirs = model.student.state_dict()
    for k, v in plain.state_dict().items():
        assert torch.equal(v, theirs[k]), k


def test_mismatched_distiller_checkpoint_names_the_export_command(distilled):
    _, ckpt = distilled
    plain = build_model(cfg_for("retinanet_R18_FPN_student.yaml"))
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(ValueError, match=r"python -m d2_distill\.export") as e:
        DistillCheckpointer(plain).load(ckpt)
    assert ckpt in str(e.value) and "does not match this RetinaNet" in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())  # nothing loaded


def test_eval_only_plain_student_config_with_distiller_checkpoint(distilled, tmp_path, caplog):
    _, ckpt = distilled
    opts = SMALL + ["OUTPUT_DIR", str(tmp_path), "MODEL.WEIGHTS", ckpt]
    args = default_argument_parser().parse_args(
        ["--config-file", qs("faster_rcnn_R18_FPN_student.yaml"), "--eval-only", *opts])
    with caplog.at_level(logging.INFO):
        results = _train_net().main(args)
    assert "loading its student" in caplog.text and "bbox" in results


# ---- training needs the teacher ----------------------------------------------------------
def test_training_a_teacherless_distiller_says_how_to_attach(no_teacher):
    model = build_model(cfg_for("tar_faster_rcnn_paper.yaml", *ABSENT))
    model.train()
    with EventStorage(0), pytest.raises(RuntimeError, match=r"attach_teacher\(model, cfg\)"):
        model(fake_batch(1))


def test_trainer_fails_at_once_without_teacher_weights(tmp_path):
    cfg = cfg_for("tar_faster_rcnn_paper.yaml", teacher=str(tmp_path / "missing.pth"), out_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        DistillTrainer(cfg)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_teacher_is_refused_at_load(frcnn_teacher_weights, tmp_path, bad):
    state = torch.load(frcnn_teacher_weights, map_location="cpu", weights_only=True)
    key = "backbone.fpn_output3.weight"
    state["model"][key] = state["model"][key].clone()
    state["model"][key].view(-1)[:3] = bad
    path = tmp_path / "broken_teacher.pth"
    torch.save(state, path)
    cfg = cfg_for("tar_faster_rcnn_paper.yaml", teacher=str(path), out_dir=tmp_path)
    with pytest.raises(RuntimeError) as e:
        DistillTrainer(cfg)  # at load, not at the first step
    msg = str(e.value)
    assert str(path) in msg and repr(key) in msg and "3 NaN/Inf" in msg
