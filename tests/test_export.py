"""Tests of d2_distill.export: student extraction, vanilla round trip, tracing, CLI.

The teachers are random checkpoints (conftest); the students are the quickstart
R18 configs, perturbed so their weights differ from a fresh initialisation. The
round trip runs the exported student in a subprocess that never imports
d2_distill and compares its predictions with the Distiller's (eval mode).
"""
from __future__ import annotations

import fractions
import logging
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from d2_distill.engine import DistillCheckpointer, setup_cfg
from d2_distill.export import export_student, trace_student, verify_traced

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart")
MINI = ["DATASETS.TRAIN", "('shapes_mini_train',)", "DATASETS.TEST", "('shapes_mini_val',)"]
EXPORT_OPTS = ["MODEL.DEVICE", "cpu"] + MINI

CASES = {
    "faster_rcnn": ("tar_faster_rcnn_paper.yaml", "frcnn_teacher_weights"),
    "retinanet": ("tbd_retinanet.yaml", "retina_teacher_weights"),
}


def _subprocess_env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture(scope="module")
def val_images():
    """The first 2 images of shapes_mini_val: (paths, HWC BGR uint8 arrays)."""
    from detectron2.data import DatasetCatalog

    from d2_distill.data import ensure_datasets

    ensure_datasets(["shapes_mini_val"])
    paths = [r["file_name"] for r in DatasetCatalog.get("shapes_mini_val")[:2]]
    images = [cv2.imread(p, cv2.IMREAD_COLOR) for p in paths]
    assert all(im is not None and im.shape == (256, 256, 3) for im in images)
    return paths, images


@pytest.fixture(scope="module")
def _distilled_cache(request, tmp_path_factory):
    """name -> a Distiller with a perturbed student, its DistillCheckpointer
    checkpoint and its export; each built once per module."""
    from trainable import build_trainable

    cache = {}

    def get(name: str) -> SimpleNamespace:
        if name in cache:
            return cache[name]
        config_name, weights_fixture = CASES[name]
        config_file = os.path.join(QUICKSTART, config_name)
        teacher_weights = request.getfixturevalue(weights_fixture)
        cfg = setup_cfg(config_file, ["DISTILL.TEACHER.WEIGHTS", teacher_weights] + EXPORT_OPTS)
        model = build_trainable(cfg)  # with the method: its adapters are in the checkpoint
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.student.parameters():
                p.add_(0.01 * torch.randn_like(p))
            if name == "retinanet":
                # lift the focal-loss prior (sigmoid ~0.01 < SCORE_THRESH_TEST) so there are detections
                model.student.head.cls_score.bias.add_(3.0)
        model.eval()

        tmp = tmp_path_factory.mktemp(f"export_{name}")
        ckpt_dir = tmp / "distill"
        ckpt_dir.mkdir()
        DistillCheckpointer(model, save_dir=str(ckpt_dir)).save("model_final")
        checkpoint = str(ckpt_dir / "model_final.pth")
        weights, config = export_student(config_file, checkpoint, str(tmp / "export"), EXPORT_OPTS)
        cache[name] = SimpleNamespace(
            name=name, cfg=cfg, config_file=config_file, model=model, tmp=tmp,
            checkpoint=checkpoint, weights=weights, config=config,
        )
        return cache[name]

    return get


@pytest.fixture(scope="module", params=sorted(CASES))
def distilled(request, _distilled_cache):
    """Each case of CASES in turn (see _distilled_cache)."""
    return _distilled_cache(request.param)


@pytest.fixture(scope="module")
def frcnn_distilled(_distilled_cache):
    """The Faster R-CNN case only."""
    return _distilled_cache("faster_rcnn")


def _eager(model, cfg, image: np.ndarray):
    """The Distiller's eval-mode predictions on one BGR image, resized to the
    config's test size as detectron2's DefaultPredictor (and the vanilla script) do."""
    from detectron2.data import transforms as T

    h, w = image.shape[:2]
    resized = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST).get_transform(image).apply_image(image)
    tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)).astype("float32"))
    with torch.no_grad():
        return model([{"image": tensor, "height": h, "width": w}])[0]["instances"]


# ---------------------------------------------------------------------------
# The distiller checkpoint
# ---------------------------------------------------------------------------
def test_distiller_checkpoint_holds_student_and_method_only(distilled):
    state = torch.load(distilled.checkpoint, map_location="cpu", weights_only=True)["model"]
    assert not [k for k in state if k.startswith("teacher.")]
    student = {"student." + k for k in distilled.model.student.state_dict()}
    method = {"method." + k for k in distilled.model.method.state_dict()}
    assert method, "the method has adapters, they must be saved"
    assert set(state) == student | method


def test_checkpoints_load_with_weights_only(distilled):
    exported = torch.load(distilled.weights, map_location="cpu", weights_only=True)
    assert set(exported) == {"model"}
    student = distilled.model.student.state_dict()
    assert set(exported["model"]) == set(student)
    for k, v in exported["model"].items():
        assert type(v) is torch.Tensor, k
        assert torch.equal(v, student[k]), k
    # the distiller checkpoint, as written by DistillCheckpointer (model only) ...
    assert set(torch.load(distilled.checkpoint, map_location="cpu", weights_only=True)) == {"model"}


def test_trainer_style_checkpoint_loads_with_weights_only(distilled, tmp_path):
    """... and with what DefaultTrainer adds: optimizer (with momentum state), scheduler, iteration."""
    from detectron2.solver import build_lr_scheduler, build_optimizer

    cfg = distilled.cfg.clone()
    cfg.defrost()
    cfg.SOLVER.BASE_LR = 0.0  # a real step that leaves the weights as they are
    model = distilled.model
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    model.zero_grad()
    sum(p.sum() for p in model.parameters() if p.requires_grad).backward()
    optimizer.step()
    scheduler.step()
    model.zero_grad(set_to_none=True)
    DistillCheckpointer(model, save_dir=str(tmp_path), optimizer=optimizer, scheduler=scheduler).save(
        "model_0000001", iteration=1
    )
    loaded = torch.load(str(tmp_path / "model_0000001.pth"), map_location="cpu", weights_only=True)
    assert set(loaded) == {"model", "optimizer", "scheduler", "iteration"}
    assert loaded["optimizer"]["state"], "momentum buffers expected"
    # and it exports like the model-only checkpoint
    weights, _ = export_student(distilled.config_file, str(tmp_path / "model_0000001.pth"),
                                str(tmp_path / "export"), EXPORT_OPTS)
    a = torch.load(weights, weights_only=True)["model"]
    b = torch.load(distilled.weights, weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_non_tensor_checkpoint_falls_back_with_a_log_line(distilled, tmp_path, caplog):
    ckpt = torch.load(distilled.checkpoint, map_location="cpu", weights_only=True)
    ckpt["extra"] = fractions.Fraction(1, 3)  # not on torch's weights_only allow-list
    path = str(tmp_path / "with_extra.pth")
    torch.save(ckpt, path)
    with caplog.at_level(logging.WARNING, logger="d2_distill.export"):
        weights, _ = export_student(distilled.config_file, path, str(tmp_path / "export"), EXPORT_OPTS,
                                    verify=False)
    assert any("weights_only" in r.getMessage() and "falling back" in r.getMessage() for r in caplog.records)
    a = torch.load(weights, weights_only=True)["model"]
    b = torch.load(distilled.weights, weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_detectron2_pkl_checkpoint_is_read_by_detectron2(distilled, tmp_path):
    """A model-zoo style .pkl (numpy arrays): read through detectron2, exported the same."""
    import pickle

    state = torch.load(distilled.checkpoint, map_location="cpu", weights_only=True)["model"]
    path = str(tmp_path / "distilled.pkl")
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "test"}, f)
    weights, _ = export_student(distilled.config_file, path, str(tmp_path / "export"), EXPORT_OPTS,
                                verify=False)
    a = torch.load(weights, weights_only=True)["model"]
    b = torch.load(distilled.weights, weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------
# The exported config
# ---------------------------------------------------------------------------
def test_exported_config_is_vanilla(distilled):
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(distilled.config)  # raises on any unknown key
    assert "DISTILL" not in cfg
    assert cfg.MODEL.META_ARCHITECTURE == distilled.cfg.DISTILL.STUDENT_META_ARCHITECTURE
    assert os.path.samefile(cfg.MODEL.WEIGHTS, distilled.weights)
    assert cfg.DATASETS.TEST == ("shapes_mini_val",)
    with open(distilled.config) as f:
        assert "DISTILL" not in f.read()


def test_export_rejects_a_plain_config(distilled, tmp_path):
    plain = os.path.join(QUICKSTART, "faster_rcnn_R18_FPN_student.yaml")
    with pytest.raises(ValueError, match="not a Distiller config"):
        export_student(plain, distilled.checkpoint, str(tmp_path), EXPORT_OPTS)


def test_unknown_non_distill_key_fails_loudly():
    from d2_distill.student import vanilla_student_cfg

    cfg = setup_cfg(os.path.join(QUICKSTART, "tar_faster_rcnn_paper.yaml"), ["MODEL.DEVICE", "cpu"])
    cfg.defrost()
    cfg.MODEL.MY_EXTENSION_KEY = 1
    with pytest.raises(ValueError, match=r"MODEL\.MY_EXTENSION_KEY"):
        vanilla_student_cfg(cfg, "/x/model_final.pth")


def test_plain_checkpoint_is_not_exported(frcnn_teacher_weights, tmp_path):
    with pytest.raises(ValueError, match="is not a distiller checkpoint: it has no 'student.\\*' keys"):
        export_student(os.path.join(QUICKSTART, "tar_faster_rcnn_paper.yaml"), frcnn_teacher_weights,
                       str(tmp_path), EXPORT_OPTS)


# ---------------------------------------------------------------------------
# Round trip through vanilla detectron2, in a process without d2_distill
# ---------------------------------------------------------------------------
VANILLA_SCRIPT = textwrap.dedent(
    r"""
    import os, sys
    import cv2, numpy as np, torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.data import transforms as T
    from detectron2.modeling import build_model

    config_file, out_file, *image_files = sys.argv[1:]
    # the test process's thread count, so both sides sum in the same order
    torch.set_num_threads(int(os.environ.get("D2_DISTILL_TEST_THREADS", "1")))
    cfg = get_cfg()
    cfg.merge_from_file(config_file)
    cfg.freeze()
    model = build_model(cfg)  # as DefaultPredictor does
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    # every tensor of the file was loaded, nothing else is in the model
    saved = torch.load(cfg.MODEL.WEIGHTS, map_location="cpu", weights_only=True)["model"]
    own = model.state_dict()
    assert set(own) == set(saved), sorted(set(own) ^ set(saved))
    assert all(torch.equal(own[k], saved[k]) for k in own)

    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    out = {}
    with torch.no_grad():
        for i, path in enumerate(image_files):
            image = cv2.imread(path, cv2.IMREAD_COLOR)
            if cfg.INPUT.FORMAT == "RGB":
                image = image[:, :, ::-1]
            h, w = image.shape[:2]
            image = aug.get_transform(image).apply_image(image)
            tensor = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
            inst = model([{"image": tensor, "height": h, "width": w}])[0]["instances"]
            out[f"boxes{i}"] = inst.pred_boxes.tensor.numpy()
            out[f"scores{i}"] = inst.scores.numpy()
            out[f"classes{i}"] = inst.pred_classes.numpy()
    np.savez(out_file, **out)
    leaked = sorted(m for m in sys.modules if m == "d2_distill" or m.startswith("d2_distill."))
    assert not leaked, f"d2_distill was imported: {leaked}"
    print("vanilla", cfg.MODEL.META_ARCHITECTURE, "ok")
    """
)


@pytest.mark.slow
def test_roundtrip_in_vanilla_detectron2(distilled, val_images, tmp_path):
    paths, images = val_images
    out = tmp_path / "predictions.npz"
    proc = subprocess.run(
        [sys.executable, "-c", VANILLA_SCRIPT, distilled.config, str(out), *paths],
        cwd=str(tmp_path), env=_subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "vanilla" in proc.stdout
    theirs = np.load(str(out))
    for i, image in enumerate(images):
        ours = _eager(distilled.model, distilled.cfg, image)
        assert len(ours) > 0, "a comparison of empty predictions proves nothing"
        assert theirs[f"boxes{i}"].shape == (len(ours), 4)
        np.testing.assert_array_equal(theirs[f"classes{i}"], ours.pred_classes.numpy())
        np.testing.assert_allclose(theirs[f"boxes{i}"], ours.pred_boxes.tensor.numpy(), rtol=1e-6, atol=1e-3)  # px: float noise
        np.testing.assert_allclose(theirs[f"scores{i}"], ours.scores.numpy(), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------
# Tracing
# ---------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.slow
def test_torchscript_trace_matches_eager(frcnn_distilled, val_images, tmp_path):
    d = frcnn_distilled
    _, images = val_images
    paths = trace_student(d.config, d.weights, images, str(tmp_path))
    assert set(paths) == {"torchscript"} and os.path.isfile(paths["torchscript"])

    # independently: the graph traced on image 0 vs the Distiller's own student on
    # both images, raw R-CNN outputs (detectron2 traces them without post-processing)
    traced = torch.jit.load(paths["torchscript"], map_location="cpu")
    for image in images:
        tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)).astype("float32"))
        with torch.no_grad():
            raw = d.model.student.inference([{"image": tensor}], do_postprocess=False)[0]
            boxes, classes, scores, size = traced(tensor)  # the fields, sorted by name, then image size
        assert len(raw) > 0
        assert torch.equal(classes, raw.pred_classes)
        torch.testing.assert_close(boxes, raw.pred_boxes.tensor, rtol=0, atol=1e-4)
        torch.testing.assert_close(scores, raw.scores, rtol=0, atol=1e-4)
        assert tuple(size.tolist()) == (256, 256)

    # the module's own check (post-processed, as the CLI reports it)
    assert verify_traced(d.config, d.weights, paths["torchscript"], images) <= 1e-4


def test_onnx_needs_the_onnx_package(frcnn_distilled, val_images, tmp_path):
    try:
        import onnx  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("onnx is installed")
    with pytest.raises(RuntimeError, match="pip install onnx"):
        trace_student(frcnn_distilled.config, frcnn_distilled.weights, val_images[1], str(tmp_path), ("onnx",))


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "d2_distill.export", *args],
        cwd=str(cwd), env=_subprocess_env(), capture_output=True, text=True, timeout=300,
    )


@pytest.mark.slow
def test_cli_missing_weights(tmp_path):
    missing = str(tmp_path / "no_such_dir" / "model_final.pth")
    proc = _cli("--config-file", os.path.join(QUICKSTART, "tar_faster_rcnn_paper.yaml"), "--weights", missing,
                "--output", str(tmp_path / "out"), "MODEL.DEVICE", "cpu", cwd=tmp_path)
    assert proc.returncode != 0
    assert missing in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_plain_checkpoint(frcnn_teacher_weights, tmp_path):
    proc = _cli("--config-file", os.path.join(QUICKSTART, "tar_faster_rcnn_paper.yaml"), "--weights",
                frcnn_teacher_weights, "--output", str(tmp_path / "out"), "MODEL.DEVICE", "cpu", cwd=tmp_path)
    assert proc.returncode != 0
    assert "is not a distiller checkpoint" in proc.stderr
    assert "a plain detectron2 checkpoint needs no export" in proc.stderr


def test_default_predictor_loads_an_exported_student_into_a_distiller_config(distilled):
    """DefaultPredictor given the distiller config and the exported (plain) student:
    the student-only distiller it builds holds exactly the exported tensors."""
    from detectron2.engine import DefaultPredictor

    cfg = setup_cfg(distilled.config_file, EXPORT_OPTS + ["MODEL.WEIGHTS", distilled.weights])
    predictor = DefaultPredictor(cfg)
    assert type(predictor.model).__name__ == "Distiller" and predictor.model.method is None
    saved = torch.load(distilled.weights, map_location="cpu", weights_only=True)["model"]
    student = predictor.model.student.state_dict()
    assert set(student) == set(saved)
    assert all(torch.equal(student[k], saved[k]) for k in saved)
    assert all(torch.equal(student[k], v) for k, v in distilled.model.student.state_dict().items())


def test_a_plain_checkpoint_of_another_model_is_not_loaded_silently(frcnn_distilled, frcnn_teacher_weights):
    """The R34 teacher's plain checkpoint has the student's keys with other shapes: an error."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    model = build_model(setup_cfg(frcnn_distilled.config_file, EXPORT_OPTS))
    with pytest.raises(RuntimeError, match="size mismatch for student"):
        DetectionCheckpointer(model).load(frcnn_teacher_weights)
