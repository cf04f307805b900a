"""benchmarks/step_cost.py and benchmarks/distill_gain.py: arguments, and one tiny
run of each (quickstart R18/R34 pair, 128 px, random teacher, 1-2 iterations).
No timing bound is asserted: the numbers depend on the machine's load."""
import importlib.util
import json
import math
import os

import pytest
import torch

from d2_distill.engine import setup_cfg
from helpers import ROOT, SMALL, cfg_for, fake_batch


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_usage_error(parse_args, argv, message, capsys):
    """argparse's usage error: exit status 2 and ``message`` on stderr."""
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def step_cost():
    return _load("step_cost")


@pytest.fixture(scope="module")
def distill_gain():
    return _load("distill_gain")


# ---- step_cost: arguments --------------------------------------------------------
def test_step_cost_defaults(step_cost):
    a = step_cost.parse_args([])
    assert a.pairs == ["tar_quickstart", "tbd_quickstart", "tar_coco", "tbd_coco"]
    assert (a.iters, a.warmup, a.batch, a.memory_iters) == (10, 2, 2, 1)
    assert (a.quickstart_size, a.coco_size) == (192, 320)
    assert a.device == step_cost.default_device()
    assert a.output == "output/benchmarks/step_cost.json"
    assert a.dataset == "shapes_val" and a.opts == [] and a.lr == 0.0


def test_step_cost_pairs_and_opts(step_cost):
    a = step_cost.parse_args(
        ["--pairs", "tbd_coco", "tar_quickstart", "tbd_coco", "--", "DISTILL.TAR.PROPOSALS", "both"]
    )
    assert a.pairs == ["tbd_coco", "tar_quickstart"]
    assert a.opts == ["DISTILL.TAR.PROPOSALS", "both"]
    a = step_cost.parse_args(["--iters", "3", "DISTILL.ADAPTER", "conv3x3"])
    assert a.iters == 3 and a.opts == ["DISTILL.ADAPTER", "conv3x3"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--pairs", "tar_lvis"], "unknown pair"),
        (["--pairs"], "expected at least one"),
        (["--iters", "0"], "--iters must be positive"),
        (["--iters", "-2"], "--iters must be positive"),
        (["--iters", "ten"], "invalid int"),
        (["--warmup", "-1"], "--warmup"),
        (["--batch", "0"], "--batch"),
        (["--memory-iters", "0"], "--memory-iters"),
        (["--coco-size", "16"], "--coco-size"),
        (["--device", "tpu"], "--device"),
        (["--dataset", "coco_2017_val"], "--dataset"),
        (["DISTILL.ADAPTER"], "KEY VALUE"),
    ],
)
def test_step_cost_bad_args(step_cost, capsys, argv, message):
    _assert_usage_error(step_cost.parse_args, argv, message, capsys)


def test_step_cost_pair_configs_build_nothing(step_cost):
    """Every pair's configs resolve (the COCO teachers from the model zoo) without building a model."""
    expected = {"tar_quickstart": "TAR", "tbd_quickstart": "TBD", "tar_coco": "TAR", "tbd_coco": "TBD"}
    for name, method in expected.items():
        cfg, tcfg = step_cost.pair_configs(name, "cpu")
        assert cfg.DISTILL.METHOD == method and cfg.MODEL.META_ARCHITECTURE == "Distiller"
        assert tcfg.MODEL.META_ARCHITECTURE == ("GeneralizedRCNN" if method == "TAR" else "RetinaNet")
    _, tcfg = step_cost.pair_configs("tar_coco", "cpu")
    assert tcfg.MODEL.RESNETS.DEPTH == 101


def test_calibrate_frozen_bn(step_cost):
    """A random FrozenBN backbone (identity statistics, as the model-zoo configs build it)
    gets normalised activations; GroupNorm models are left alone."""
    from detectron2.modeling import build_model

    frozen = ["MODEL.RESNETS.NORM", "FrozenBN", "MODEL.FPN.NORM", "", "MODEL.PIXEL_STD", "[1.0, 1.0, 1.0]"]
    model = build_model(cfg_for("faster_rcnn_R18_FPN_student.yaml", *frozen))
    batch = fake_batch(2, 128)

    def feature_scale():
        with torch.no_grad():
            feats = model.backbone(model.preprocess_image(batch).tensor)
        return max(float(f.abs().mean()) for f in feats.values())

    before = feature_scale()
    assert step_cost.calibrate_frozen_bn(model, batch) > 0
    after = feature_scale()
    assert after < 10 < before
    gn = build_model(cfg_for("faster_rcnn_R18_FPN_student.yaml"))
    assert step_cost.calibrate_frozen_bn(gn, batch) == 0


# ---- step_cost: a tiny run -------------------------------------------------------
def test_step_cost_tiny_run(step_cost, tmp_path, capsys):
    out = tmp_path / "step_cost.json"
    step_cost.main([
        "--pairs", "tar_quickstart", "--quickstart-size", "128", "--batch", "1", "--iters", "2",
        "--warmup", "1", "--device", "cpu", "--threads", "1", "--dataset", "shapes_mini_val",
        "--output", str(out),
    ])
    summary = json.loads(out.read_text())
    assert summary["device"] == "cpu" and summary["memory_measure"].startswith("cpu: peak RSS growth")
    r = summary["pairs"]["tar_quickstart"]
    assert r["input_size"] == 128 and r["batch"] == 1 and r["method"] == "TAR"
    assert r["frozen_bn_layers_calibrated"] == {"student": 0, "teacher": 0}  # GroupNorm quickstart models
    for key in ("a_student_step_s", "b_teacher_forward_s", "c_distill_step_s", "ratio_c_over_a_plus_b"):
        assert r[key] > 0, key
    assert 0 < r["distill_share_of_c"] < 1
    assert all(len(r["times_s"][k]) == 2 for k in "abc")
    assert r["teacher_rois_per_image"] and r["teacher_rois_per_image"][0] > 0  # the box head ran on RoIs
    for k in "abc":
        assert r["memory"][k]["peak_mb"] > 0 and r["memory"][k]["peak_growth_mb"] >= 0
    assert r["ratio_c_over_a_plus_b"] == pytest.approx(
        r["c_distill_step_s"] / (r["a_student_step_s"] + r["b_teacher_forward_s"])
    )
    printed = capsys.readouterr().out
    assert "| tar_quickstart | 128 |" in printed and f"{r['ratio_c_over_a_plus_b']:.2f}" in printed
    assert "c/(a+b)" in printed


# ---- distill_gain: arguments -----------------------------------------------------
def test_distill_gain_defaults(distill_gain):
    a = distill_gain.parse_args([])
    assert a.methods == ["tar", "tbd"] and a.seeds == [0, 1, 2] and a.iters is None  # each student config's own
    assert a.runs == "output/runs" and a.output == "output/benchmarks/distill_gain.json"
    assert a.teacher_weights == {} and a.opts == []
    assert distill_gain.full_row("tar")[0] == "full TAR" and distill_gain.full_row("tbd")[0] == "full TBD"


def test_distill_gain_teacher_weights(distill_gain, tmp_path):
    w = tmp_path / "t.pth"
    w.write_bytes(b"x")
    a = distill_gain.parse_args(["--methods", "tar", "--teacher-weights", str(w)])
    assert a.teacher_weights == {"tar": str(w)}
    a = distill_gain.parse_args(["--teacher-weights", f"tbd={w}", "--iters", "2", "SOLVER.STEPS", "()"])
    assert a.teacher_weights == {"tbd": str(w)} and a.opts == ["SOLVER.STEPS", "()"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds"], "expected at least one"),
        (["--seeds", "1", "1"], "repeated seed"),
        (["--seeds", "-1"], "--seeds must be >= 0"),
        (["--iters", "0"], "--iters must be positive"),
        (["--methods", "fgd"], "unknown method"),
        (["--methods"], "expected at least one"),
        (["--methods", "tar", "--teacher-weights", "/no/such/teacher.pth"], "no such file"),
        (["--teacher-weights", "tar=/no/such/teacher.pth"], "no such file"),
        (["--teacher-weights", "__FILE__"], "METHOD=PATH"),
        (["--methods", "tar", "--teacher-weights", "tbd=__FILE__"], "not in --methods"),
        (["SOLVER.MAX_ITER"], "KEY VALUE"),
    ],
)
def test_distill_gain_bad_args(distill_gain, capsys, tmp_path, argv, message):
    w = tmp_path / "t.pth"
    w.write_bytes(b"x")
    argv = [x.replace("__FILE__", str(w)) for x in argv]
    _assert_usage_error(distill_gain.parse_args, argv, message, capsys)


# ---- distill_gain: a tiny run ----------------------------------------------------
def test_distill_gain_tiny_run(distill_gain, tmp_path, capsys, monkeypatch, request, frcnn_teacher_weights):
    monkeypatch.chdir(ROOT)  # the run cache keys on repository-relative config paths, like ablation.py
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machines' 2 cores are shared with other jobs
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    out, runs = tmp_path / "gain.json", tmp_path / "runs"
    argv = [
        "--methods", "tar", "--seeds", "0", "--iters", "2", "--runs", str(runs), "--output", str(out),
        "--teacher-weights", f"tar={frcnn_teacher_weights}",
        *SMALL, "SOLVER.STEPS", "()", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
    ]
    distill_gain.main(argv)
    summary = json.loads(out.read_text())
    r = summary["methods"]["tar"]
    assert summary["seeds"] == [0] and r["iters"] == 2 and r["teacher_weights"] == frcnn_teacher_weights
    assert len(r["plain_AP"]) == len(r["distilled_AP"]) == len(r["diff"]) == 1
    plain, dist = r["plain_AP"][0], r["distilled_AP"][0]
    assert isinstance(plain, float) and isinstance(dist, float)
    assert r["diff"][0] == pytest.approx(dist - plain)
    assert r["distilled_better_every_seed"] == (dist > plain)
    assert r["plain_std"] == 0.0 and r["distilled_std"] == 0.0
    # the ablation's run folders, with the distilled run on the given teacher
    seed0 = r["per_seed"][0]
    assert seed0["plain"]["run"] == os.path.join(str(runs), "tar", "iters2_seed0", "plain_student")
    assert seed0["distilled"]["run"] == os.path.join(str(runs), "tar", "iters2_seed0", "full_TAR")
    assert frcnn_teacher_weights in seed0["distilled"]["command"]
    assert "DISTILL.TEACHER.WEIGHTS" not in seed0["plain"]["command"]
    printed = capsys.readouterr().out
    assert "| TAR | 2 |" in printed and "(seed 0)" in printed

    # cached: a second call trains nothing and reports the same numbers
    results = [os.path.join(seed0[k]["run"], "results.json") for k in ("plain", "distilled")]
    mtimes = [os.path.getmtime(p) for p in results]
    again = distill_gain.main(argv)
    assert [os.path.getmtime(p) for p in results] == mtimes
    assert again["methods"]["tar"]["diff"][0] == pytest.approx(r["diff"][0])
    assert not math.isnan(again["methods"]["tar"]["plain_mean"])


# ---- demo.py and ablation.py -----------------------------------------------------
@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("_demo", os.path.join(ROOT, "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ablation():
    return _load("ablation")


def test_default_schedule_is_the_student_configs(demo, ablation):
    """--iters defaults to the plain student config's SOLVER.MAX_ITER, so the configs
    are the one place the quickstart schedule is set."""
    for method in ("tar", "tbd"):
        iters = setup_cfg(os.path.join(ROOT, ablation.SETUPS[method][0][0][1])).SOLVER.MAX_ITER
        assert demo.parse_args(["--method", method]).iters == iters
        assert ablation.parse_args(["--method", method]).iters == iters
    assert demo.parse_args(["--iters", "7"]).iters == 7


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--iters", "0"], "--iters must be positive"),
        (["--method", "fgd"], "invalid choice"),
        (["--teacher-weights", "/no/such/teacher.pth"], "no such file"),
        (["--timing-images", "0"], "--timing-images must be positive"),
        (["SOLVER.MAX_ITER"], "KEY VALUE"),
    ],
)
def test_demo_bad_args(demo, capsys, argv, message):
    _assert_usage_error(demo.parse_args, argv, message, capsys)


def test_demo_tiny_run(demo, tmp_path, capsys, monkeypatch, frcnn_teacher_weights):
    """The user's path: plain and TAR students on one schedule, the table, the figure."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "runs"
    result = demo.main([
        "--iters", "2", "--output", str(out), "--teacher-weights", frcnn_teacher_weights, "--timing-images", "2",
        *SMALL, "SOLVER.STEPS", "()", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
    ])
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["teacher", "plain student", "TAR student"]
    for r in rows.values():
        assert all(k in r for k in ("AP", "AP50", "AP75", "params_M", "GFLOPs", "ms_per_image"))
        assert r["params_M"] > 0 and r["GFLOPs"] > 0 and r["ms_per_image"] > 0
    # what is deployed is the student alone: same size with or without distillation, smaller than the teacher
    assert rows["TAR student"]["params_M"] == rows["plain student"]["params_M"] < rows["teacher"]["params_M"]
    assert rows["TAR student"]["GFLOPs"] == pytest.approx(rows["plain student"]["GFLOPs"])
    with open(result["figure"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "demo_tar.json").read_text())
    assert [r["model"] for r in saved["rows"]] == list(rows) and saved["iters"] == 2
    printed = capsys.readouterr().out
    assert "| TAR student |" in printed and "[demo] 4/4" in printed
    for name in ("plain_student", "full_TAR"):
        assert os.path.isfile(out / "tar" / "iters2_seed0" / name / "model_final.pth")


# ---- loss_gradients.py -----------------------------------------------------------
@pytest.fixture(scope="module")
def loss_gradients():
    return _load("loss_gradients")


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "--config-file"),
        (["--config-file", "/no/such.yaml"], "no such file"),
        (["--config-file", "__CFG__", "--batches", "0"], "--batches must be positive"),
        (["--config-file", "__CFG__", "--student-weights", "/no/such.pth"], "no such file"),
        (["--config-file", "__CFG__", "SOLVER.MAX_ITER"], "KEY VALUE"),
    ],
)
def test_loss_gradients_bad_args(loss_gradients, capsys, argv, message):
    cfg = os.path.join(ROOT, "configs", "quickstart", "tar_faster_rcnn.yaml")
    _assert_usage_error(loss_gradients.parse_args, [a.replace("__CFG__", cfg) for a in argv], message, capsys)


def test_loss_gradients_tiny_run(loss_gradients, tmp_path, capsys, frcnn_teacher_weights):
    cfg = os.path.join(ROOT, "configs", "quickstart", "tar_faster_rcnn.yaml")
    out = tmp_path / "grads.json"
    result = loss_gradients.main([
        "--config-file", cfg, "--teacher-weights", frcnn_teacher_weights, "--batches", "1",
        "--output", str(out), *SMALL,
    ])
    rows = result["losses"]
    assert result["parts"] == ["backbone", "proposal_generator", "roi_heads"]
    assert {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_tar_feat", "loss_tar_cls", "loss_tar_reg"} <= set(rows)
    # each loss reaches exactly the parts it depends on
    assert rows["loss_tar_feat"]["backbone"] > 0 and rows["loss_tar_feat"]["roi_heads"] == 0
    assert rows["loss_tar_feat"]["proposal_generator"] == 0
    assert rows["loss_rpn_cls"]["proposal_generator"] > 0 and rows["loss_rpn_cls"]["roi_heads"] == 0
    assert rows["loss_cls"]["roi_heads"] > 0 and rows["loss_cls"]["proposal_generator"] == 0
    assert json.loads(out.read_text())["losses"]["loss_tar_feat"]["backbone"] == pytest.approx(
        rows["loss_tar_feat"]["backbone"])
    assert "| loss_tar_feat |" in capsys.readouterr().out


def test_loss_gradients_needs_a_distiller(loss_gradients):
    with pytest.raises(SystemExit, match="needs a distiller config"):
        loss_gradients.main(["--config-file", os.path.join(ROOT, "configs", "quickstart",
                                                           "faster_rcnn_R18_FPN_student.yaml"), *SMALL])
