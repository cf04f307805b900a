"""The lab's scripts (python -m benchmarks.<name>): arguments, and one tiny run of
each (quickstart pairs, 128 px, random teacher, 1-2 iterations). No timing bound
is asserted: the numbers depend on the machine's load."""
import glob
import io
import json
import logging
import math
import os
import re
import sys

import pytest
import torch

from benchmarks import ablation, demo, distill_gain, loss_gradients, profile_step, setups, stats, step_cost, teacher_seeds
from d2_distill.engine import setup_cfg
from helpers import ROOT, SMALL, cfg_for, changed_keys, fake_batch

TINY = [*SMALL, "SOLVER.STEPS", "()", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]


def _assert_usage_error(parse_args, argv, message, capsys):
    """argparse's usage error: exit status 2 and ``message`` on stderr."""
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


# ---- step_cost: arguments --------------------------------------------------------
def test_step_cost_defaults():
    a = step_cost.parse_args([])
    pairs = list(a.pairs)
    # every distilled config with a registered method, found not listed; Base-* files are not configs
    assert {"tar_faster_rcnn", "tbd_retinanet", "tar_faster_rcnn_R50_from_R101", "tbd_retinanet_R50_from_R101"} <= set(pairs)
    assert {a.pairs[x][1] for x in pairs} == {"quickstart", "coco"} and not any(x.startswith("Base-") for x in pairs)
    assert (a.iters, a.warmup, a.batch, a.memory_iters) == (10, 2, 2, 1)
    assert (a.quickstart_size, a.coco_size) == (0, 320)  # 0: each quickstart config's own test size
    assert a.device == step_cost.default_device()
    assert a.output == "output/benchmarks/step_cost.json"
    assert a.dataset == "shapes_val" and a.opts == [] and a.lr == 0.0


def test_step_cost_pairs_and_opts():
    a = step_cost.parse_args(["--pairs", "tbd_retinanet_R50_from_R101", "tar_faster_rcnn",
                              "tbd_retinanet_R50_from_R101", "--", "DISTILL.TAR.PROPOSALS", "both"])
    assert list(a.pairs) == ["tbd_retinanet_R50_from_R101", "tar_faster_rcnn"]
    assert a.opts == ["DISTILL.TAR.PROPOSALS", "both"]
    a = step_cost.parse_args(["--iters", "3", "DISTILL.ADAPTER", "conv3x3"])
    assert a.iters == 3 and a.opts == ["DISTILL.ADAPTER", "conv3x3"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--pairs", "tar_lvis"], "--pairs: unknown tar_lvis"),
        (["--pairs"], "expected at least one"),
        (["--iters", "0"], "--iters must be positive"),
        (["--iters", "-2"], "--iters must be positive"),
        (["--iters", "ten"], "invalid int"),
        (["--warmup", "-1"], "--warmup"),
        (["--batch", "0"], "--batch"),
        (["--memory-iters", "0"], "--memory-iters"),
        (["--coco-size", "16"], "--coco-size"),
        (["--quickstart-size", "16"], "--quickstart-size"),
        (["--device", "tpu"], "--device"),
        (["--dataset", "coco_2017_val"], "--dataset"),
        (["DISTILL.ADAPTER"], "KEY VALUE"),
    ],
)
def test_step_cost_bad_args(capsys, argv, message):
    _assert_usage_error(step_cost.parse_args, argv, message, capsys)


def test_step_cost_pair_configs_build_nothing():
    """Every pair's configs resolve (the COCO teachers from the model zoo) without building a model."""
    for name, (config, _) in step_cost.discover_pairs().items():
        cfg, tcfg = step_cost.pair_configs(config, "cpu")
        assert cfg.MODEL.META_ARCHITECTURE == "Distiller", name
        assert tcfg.MODEL.META_ARCHITECTURE == cfg.DISTILL.STUDENT_META_ARCHITECTURE, name
    _, tcfg = step_cost.pair_configs("configs/COCO/tar_faster_rcnn_R50_from_R101.yaml", "cpu")
    assert tcfg.MODEL.RESNETS.DEPTH == 101


def test_calibrate_frozen_bn():
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
@pytest.mark.parametrize("pair", ["tar_faster_rcnn", "tbd_retinanet"])
def test_step_cost_tiny_run(tmp_path, capsys, pair):
    """The same generic phases for a two-stage and a one-stage method."""
    out = tmp_path / "step_cost.json"
    step_cost.main([
        "--pairs", pair, "--quickstart-size", "128", "--batch", "1", "--iters", "2",
        "--warmup", "1", "--device", "cpu", "--threads", "1", "--dataset", "shapes_mini_val",
        "--output", str(out),
    ])
    summary = json.loads(out.read_text())
    assert summary["device"] == "cpu" and summary["memory_measure"].startswith("cpu: peak RSS growth")
    r = summary["pairs"][pair]
    assert r["input_size"] == 128 and r["batch"] == 1 and r["method"] == pair[:3].upper()
    assert r["frozen_bn_layers_calibrated"] == {"student": 0, "teacher": 0}  # GroupNorm quickstart models
    for key in ("a_student_step_s", "b_teacher_forward_s", "h_teacher_heads_s", "c_distill_step_s",
                "ratio_c_over_a_plus_b", "ratio_c_over_floor", "memory_ratio_c_over_floor"):
        assert r[key] > 0, key
    assert r["ratio_c_over_floor"] == pytest.approx(
        r["c_distill_step_s"] / (r["a_student_step_s"] + r["b_teacher_forward_s"] + r["h_teacher_heads_s"]))
    assert set(r["breakdown_s"]) == {k for k, _ in step_cost.BREAKDOWN}
    assert r["parts_s"]["c_teacher_heads"] > 0  # both methods run teacher heads in the step
    assert 0 < r["method_share_of_c"] < 1 and 0 < r["method_forward_in_c_s"] < r["c_distill_step_s"]
    assert 0 < r["teacher_backbone_in_c_s"] < r["c_distill_step_s"]
    assert all(len(r["times_s"][k]) == 2 for k in "abhc")
    for k in "abhc":
        assert r["memory"][k]["peak_mb"] > 0 and r["memory"][k]["peak_growth_mb"] >= 0
    assert r["ratio_c_over_a_plus_b"] == pytest.approx(
        r["c_distill_step_s"] / (r["a_student_step_s"] + r["b_teacher_forward_s"])
    )
    printed = capsys.readouterr().out
    assert f"| {pair} | 128 |" in printed and f"{r['ratio_c_over_a_plus_b']:.2f}" in printed
    assert "c/(a+b)" in printed and f"{r['ratio_c_over_floor']:.3f}" in printed


@pytest.mark.parametrize("config, opts", [
    ("tar_faster_rcnn", []),
    ("tar_faster_rcnn_paper", ["DISTILL.TAR.PROPOSALS", "both"]),
    ("tar_faster_rcnn_paper", ["DISTILL.TAR.CLS_WEIGHT", "0.0", "DISTILL.TAR.REG_WEIGHT", "0.0"]),
    ("tbd_retinanet", []),
    ("pkd_faster_rcnn", []),
])
def test_h_phase_is_the_teacher_work_of_a_training_step(tmp_path, config, opts):
    """Teacher module calls (forward hooks on every teacher module) of one training
    forward equal those of phase b (preprocess + backbone) plus phase h
    (method.teacher_heads on a recorded step): the floor cannot silently shrink."""
    from collections import Counter

    from detectron2.utils.events import EventStorage

    _, model, batch, _ = step_cost.build_distiller(
        f"configs/quickstart/{config}.yaml", "cpu", opts, str(tmp_path), "shapes_mini_val", 128, 1)
    model.train()
    calls = step_cost.TeacherCalls(model.teacher, step_cost.Synchronizer(torch.device("cpu")))
    with EventStorage(0):
        model(batch)
        in_step = Counter(calls.counts)
        step = step_cost.recorded_step(model, batch)
        calls.reset()
        with torch.no_grad():
            model.teacher.backbone(model.teacher.preprocess(batch, model.input_format, model.size_divisibility))
        in_b = Counter(calls.counts)
        calls.reset()
        with torch.no_grad():
            model.method.teacher_heads(step)
        in_h = Counter(calls.counts)
    calls.remove()
    assert in_b and in_step == in_b + in_h
    heads = {k.split(".")[0] for k in in_h}
    expected = {
        "tar_faster_rcnn": {"roi_heads"},
        "tar_faster_rcnn_paper": {"roi_heads", "proposal_generator"} if "both" in opts else set(),
        "tbd_retinanet": {"head", "anchor_generator"},
        "pkd_faster_rcnn": set(),
    }[config]
    assert heads == expected


# ---- profile_step -------------------------------------------------------------------
QS_DIR = os.path.join(ROOT, "configs", "quickstart")


@pytest.mark.parametrize(
    "argv,message",
    [
        ([], "--config-file"),
        (["--config-file", "/no/such.yaml"], "no such file"),
        (["--config-file", "__CFG__", "--iters", "0"], "--iters must be positive"),
        (["--config-file", "__CFG__", "--threads", "0"], "--threads must be positive"),
        (["--config-file", "__CFG__", "--warmup", "-1"], "--warmup"),
        (["--config-file", "__CFG__", "--batch", "-1"], "--batch"),
        (["--config-file", "__CFG__", "--dataset", "coco_2017_val"], "--dataset"),
        (["--config-file", "__CFG__", "SOLVER.MAX_ITER"], "KEY VALUE"),
    ],
)
def test_profile_step_bad_args(capsys, argv, message):
    cfg = os.path.join(QS_DIR, "retinanet_R18_FPN_student.yaml")
    _assert_usage_error(profile_step.parse_args, [a.replace("__CFG__", cfg) for a in argv], message, capsys)


def test_profile_step_tiny_run_of_a_plain_model(capsys):
    """A plain detectron2 model's step: its convolutions show up, shares are of the total."""
    result = profile_step.main([
        "--config-file", os.path.join(QS_DIR, "retinanet_R18_FPN_student.yaml"), "--iters", "1", "--warmup", "0",
        "--batch", "1", "--top", "40", "--by-shape", "--dataset", "shapes_mini_val", "--", *SMALL,
    ])
    ops = result["ops"]
    assert result["seconds_per_step"] > 0 and 0 < len(ops) <= 40
    assert all(0 <= op["share"] <= 1 for op in ops) and sum(op["share"] for op in ops) <= 1 + 1e-6
    assert [op["self_s"] for op in ops] == sorted((op["self_s"] for op in ops), reverse=True)
    conv = [op for op in ops if op["name"] == "aten::convolution_backward"]
    assert conv and all(op["shapes"].startswith("[[1, ") for op in conv)  # batch 1, grouped by input shape
    printed = capsys.readouterr().out
    assert "s per step (profiler on, 1 steps)" in printed and "| aten::convolution_backward |" in printed


def test_profile_step_builds_the_distiller_of_a_distilled_config(tmp_path):
    """A distilled config profiles the Distiller's step, whose trainable parameters exclude the teacher."""
    args = profile_step.parse_args([
        "--config-file", os.path.join(QS_DIR, "tar_faster_rcnn.yaml"), "--batch", "1",
        "--dataset", "shapes_mini_val", "MODEL.DEVICE", "cpu"])
    model, params, batch = profile_step.build(args, str(tmp_path))
    assert type(model).__name__ == "Distiller" and model.training and len(batch) == 1
    teacher = {id(q) for q in model.teacher.parameters()}
    assert params and not teacher & {id(q) for q in params}
    assert {id(q) for q in model.student.parameters()} <= {id(q) for q in params}


# ---- distill_gain: arguments -----------------------------------------------------
def test_distill_gain_defaults():
    a = distill_gain.parse_args([])
    # every method with a quickstart config, discovered
    assert a.methods == sorted(setups.discover_setups()) and {"tar", "tbd"} <= set(a.methods)
    assert a.seeds == [0, 1, 2] and a.iters is None  # each student config's own
    assert a.runs == "output/runs" and a.output == "output/benchmarks/distill_gain.json"
    assert a.teacher_weights == {} and a.opts == []


def test_distill_gain_teacher_weights(tmp_path):
    w = tmp_path / "t.pth"
    w.write_bytes(b"x")
    a = distill_gain.parse_args(["--methods", "TAR", "--teacher-weights", str(w)])
    # every TAR config distils from the same teacher config: a bare PATH serves them all
    tar_configs = {s.key for s in setups.discover_setups()["tar"]}
    assert {"tar_faster_rcnn", "tar_faster_rcnn_paper"} <= tar_configs
    assert a.methods == ["tar"] and a.teacher_weights == {k: str(w) for k in tar_configs}
    a = distill_gain.parse_args(["--methods", "tar", "--teacher-weights", f"tar_faster_rcnn_paper={w}"])
    assert a.teacher_weights == {"tar_faster_rcnn_paper": str(w)}
    a = distill_gain.parse_args(["--methods", "tar", "tbd", "--teacher-weights", f"tbd={w}", "--iters", "2",
                                 "SOLVER.STEPS", "()"])
    assert a.teacher_weights == {k: str(w) for k in ("tbd_retinanet", "tbd_retinanet_paper")}
    assert a.opts == ["SOLVER.STEPS", "()"]
    a = distill_gain.parse_args(["--methods", "tar", "tbd", "--teacher-weights", f"tar_faster_rcnn={w}"])
    assert a.teacher_weights == {"tar_faster_rcnn": str(w)}


def test_distill_gain_methods_may_name_single_configs():
    a = distill_gain.parse_args(["--methods", "tbd_retinanet", "TAR_faster_rcnn_paper"])
    assert [s.key for s in a.setups] == ["tbd_retinanet", "tar_faster_rcnn_paper"]
    a = distill_gain.parse_args(["--methods", "tar", "tar_faster_rcnn_paper"])  # the config once
    assert [s.key for s in a.setups] == [s.key for s in setups.discover_setups()["tar"]]
    assert {"tar_faster_rcnn", "tar_faster_rcnn_paper"} <= {s.key for s in a.setups}
    w = "tar_faster_rcnn_paper=" + __file__
    a = distill_gain.parse_args(["--methods", "tar_faster_rcnn_paper", "--teacher-weights", w])
    assert a.teacher_weights == {"tar_faster_rcnn_paper": __file__}


def test_gap_closed():
    assert stats.gap_closed(20.0, 10.0, 30.0) == pytest.approx(50.0)
    assert stats.gap_closed(8.0, 10.0, 30.0) == pytest.approx(-10.0)
    assert math.isnan(stats.gap_closed(12.0, 10.0, 10.0))  # no gap to close


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds"], "expected at least one"),
        (["--seeds", "1", "1"], "repeated seed"),
        (["--seeds", "-1"], "--seeds must be >= 0"),
        (["--iters", "0"], "--iters must be positive"),
        (["--methods", "fgd"], "--methods: unknown fgd"),
        (["--methods", "tar_faster_rcnn_cls"], "choose from feature, pkd, tar, tbd, "),
        (["--methods"], "expected at least one"),
        (["--methods", "tar", "--teacher-weights", "/no/such/teacher.pth"], "no such file"),
        (["--teacher-weights", "tar=/no/such/teacher.pth"], "no such file"),
        (["--methods", "tar", "tbd", "--teacher-weights", "__FILE__"], "METHOD=PATH"),
        (["--methods", "tar", "--teacher-weights", "tbd=__FILE__"], "not in --methods"),
        (["SOLVER.MAX_ITER"], "KEY VALUE"),
    ],
)
def test_distill_gain_bad_args(capsys, tmp_path, argv, message):
    w = tmp_path / "t.pth"
    w.write_bytes(b"x")
    argv = [x.replace("__FILE__", str(w)) for x in argv]
    _assert_usage_error(distill_gain.parse_args, argv, message, capsys)


# ---- distill_gain: a tiny run ----------------------------------------------------
@pytest.mark.slow
def test_distill_gain_tiny_run(tmp_path, capsys, monkeypatch, request, frcnn_teacher_weights):
    monkeypatch.chdir(ROOT)  # the run cache keys on repository-relative config paths
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machines' 2 cores are shared with other jobs
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    out, runs = tmp_path / "gain.json", tmp_path / "runs"
    argv = [
        "--methods", "tar", "--seeds", "0", "1", "--iters", "1", "--runs", str(runs), "--output", str(out),
        "--teacher-weights", f"tar={frcnn_teacher_weights}", *TINY,
    ]
    distill_gain.main(argv)
    summary = json.loads(out.read_text())
    r = summary["configs"]["tar_faster_rcnn"]
    assert summary["seeds"] == [0, 1] and r["iters"] == 1 and r["teacher_weights"] == frcnn_teacher_weights
    assert r["method"] == "TAR" and isinstance(r["teacher_AP"], float)
    assert [s["seed"] for s in r["per_seed"]] == [0, 1]
    for s in r["per_seed"]:
        assert s["diff"] == pytest.approx(s["distilled"] - s["plain"])
        assert frcnn_teacher_weights in s["distilled_command"]
        assert "DISTILL.TEACHER.WEIGHTS" not in s["plain_command"]
    plain = [s["plain"] for s in r["per_seed"]]
    assert r["plain_mean"] == pytest.approx(sum(plain) / 2)
    assert r["plain_sd"] == pytest.approx(abs(plain[0] - plain[1]) / 2 ** 0.5)  # sample sd of two values
    assert r["distilled_better_every_seed"] == all(s["diff"] > 0 for s in r["per_seed"])
    # the plain student's runs are shared by every method with that student; the distilled ones by config
    seed0 = r["per_seed"][0]
    assert seed0["plain_run"] == os.path.join(str(runs), "faster_rcnn_R18_FPN_student", "iters1_seed0", "plain_student")
    assert seed0["distilled_run"] == os.path.join(str(runs), "tar_faster_rcnn", "iters1_seed0", "full_TAR")
    printed = capsys.readouterr().out
    assert "| TAR | tar_faster_rcnn | 1 |" in printed and "seed 1:" in printed and "gap closed" in printed

    # cached: a second call trains nothing and reports the same numbers
    results = [os.path.join(s[k], "results.json") for s in r["per_seed"] for k in ("plain_run", "distilled_run")]
    mtimes = [os.path.getmtime(p) for p in results]
    again = distill_gain.main(argv)
    assert [os.path.getmtime(p) for p in results] == mtimes
    assert again["configs"]["tar_faster_rcnn"]["diff_mean"] == pytest.approx(r["diff_mean"], nan_ok=True)


# ---- demo and ablation -----------------------------------------------------------
def test_default_schedule_is_the_student_configs():
    """The lab's --iters defaults to the plain student config's SOLVER.MAX_ITER, so the
    configs are the one place the quickstart schedule is set; the demo has its own,
    shorter regime with pinned threads (students side by side)."""
    for method, found in setups.discover_setups().items():
        iters = setup_cfg(os.path.join(ROOT, found[0].plain_config)).SOLVER.MAX_ITER
        assert ablation.parse_args(["--method", method]).iters == iters
        a = demo.parse_args(["--method", method])
        assert (a.iters, a.threads, a.jobs) == (demo.DEMO_ITERS, demo.DEMO_THREADS, 2) and a.iters < iters
    assert demo.parse_args(["--iters", "7"]).iters == 7


def test_demo_accepts_any_discovered_method_in_any_case():
    for method, found in setups.discover_setups().items():
        a = demo.parse_args(["--method", method.upper()])
        assert a.method == method and a.setup == found[0]
        last = found[-1]
        assert demo.parse_args(["--method", method, "--config", last.key]).setup == last
        assert demo.parse_args(["--method", method, "--config", last.config]).setup == last


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--iters", "0"], "--iters must be positive"),
        (["--method", "fgd"], "invalid choice"),
        (["--config", "tbd_retinanet"], "not a config of tar"),
        (["--teacher-weights", "/no/such/teacher.pth"], "no such file"),
        (["--timing-images", "0"], "--timing-images must be positive"),
        (["--show-images", "0"], "--show-images must be positive"),
        (["SOLVER.MAX_ITER"], "KEY VALUE"),
        (["--precision", "fp16"], "invalid choice"),
        (["--threads", "0"], "--threads must be positive"),
        (["--teacher-iters", "-1"], "--teacher-iters must be >= 0"),
    ],
)
def test_demo_bad_args(capsys, argv, message):
    _assert_usage_error(demo.parse_args, argv, message, capsys)


@pytest.mark.parametrize("native, expected", [(True, "bfloat16"), (False, "float32")])
def test_demo_precision_auto_follows_the_cpu(monkeypatch, native, expected):
    import torch

    from d2_distill.engine import amp

    monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = demo.parse_args([])
    assert args.precision == expected
    assert args.output == ("output/runs_bf16" if native else "output/runs")  # apart from the lab's float32 runs
    assert demo.parse_args(["--precision", "float32"]).precision == "float32"
    assert demo.parse_args(["--precision", "bfloat16", "--output", "x"]).output == "x"


def test_demo_bfloat16_teacher_has_a_folder_of_its_own():
    setup = demo.parse_args(["--method", "tbd"]).setup
    assert demo.teacher_opts(setup, "float32") == []
    opts = demo.teacher_opts(setup, "bfloat16")
    cfg = setup_cfg(os.path.join(ROOT, setup.teacher_config), opts)
    assert cfg.SOLVER.AMP.ENABLED
    assert cfg.OUTPUT_DIR == setup_cfg(os.path.join(ROOT, setup.teacher_config)).OUTPUT_DIR + "_bf16"


def test_demo_teacher_schedule():
    """The demo trains its teachers shorter (lr drops at the config's fractions,
    a folder of its own); --teacher-iters 0 keeps the config's own."""
    tar = demo.parse_args(["--method", "tar"])
    tbd = demo.parse_args(["--method", "tbd"])
    assert tar.teacher_iters == 2400 and tbd.teacher_iters == 2400
    assert demo.parse_args(["--teacher-iters", "0"]).teacher_iters == 0
    cfg = setup_cfg(os.path.join(ROOT, tbd.setup.teacher_config), demo.teacher_opts(tbd.setup, "bfloat16", 2400))
    assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS) == (2400, (1800, 2200))
    own = setup_cfg(os.path.join(ROOT, tar.setup.teacher_config))
    cfg = setup_cfg(os.path.join(ROOT, tar.setup.teacher_config), demo.teacher_opts(tar.setup, "bfloat16", 2400))
    assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS) == (2400, (1950, 2250)) and cfg.SOLVER.AMP.ENABLED
    assert cfg.OUTPUT_DIR == own.OUTPUT_DIR + "_2400it_bf16"
    cfg = setup_cfg(os.path.join(ROOT, tar.setup.teacher_config), demo.teacher_opts(tar.setup, "float32", 2400))
    assert cfg.SOLVER.MAX_ITER == 2400 and not cfg.SOLVER.AMP.ENABLED and cfg.OUTPUT_DIR == own.OUTPUT_DIR + "_2400it"
    assert demo.teacher_opts(tar.setup, "float32", own.SOLVER.MAX_ITER) == []


def test_detection_loss_excludes_the_methods_declared_losses():
    history = {"loss_cls": [[0, 1.0], [1, 0.5]], "loss_box_reg": [[0, 2.0], [1, 1.0]],
               "loss_pkd": [[0, 9.0], [1, 9.0]], "total_loss": [[0, 20.0], [1, 20.0]]}
    assert demo.detection_loss(history, ("loss_pkd",)) == [(0, 3.0), (1, 1.5)]
    assert demo.detection_loss(history) == [(0, 12.0), (1, 10.5)]


@pytest.mark.slow
def test_demo_tiny_run(tmp_path, capsys, monkeypatch, frcnn_teacher_weights):
    """The user's path: plain and TAR students on one schedule, the table, the figure.
    With --jobs 2 both students train side by side in worker processes (training in
    this process is made to fail; the one-at-a-time path is the ablation's tests')."""
    from d2_distill.engine import DistillTrainer

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(DistillTrainer, "train", lambda self: pytest.fail("trained in the main process"))
    out = tmp_path / "runs"
    result = demo.main([
        "--iters", "2", "--output", str(out), "--teacher-weights", frcnn_teacher_weights, "--timing-images", "2",
        "--show-images", "2", "--show-score", "0.0", "--jobs", "2", "--precision", "bfloat16", *TINY,
    ])
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["teacher", "plain student", "TAR student"]
    for r in rows.values():
        assert all(k in r for k in ("AP", "AP50", "AP75", "harmonious_ratio", "params_M", "GFLOPs", "ms_per_image"))
        assert r["params_M"] > 0 and r["GFLOPs"] > 0 and r["ms_per_image"] > 0
    # what is deployed is the student alone: same size with or without distillation, smaller than the teacher
    assert rows["TAR student"]["params_M"] == rows["plain student"]["params_M"] < rows["teacher"]["params_M"]
    assert rows["TAR student"]["GFLOPs"] == pytest.approx(rows["plain student"]["GFLOPs"])
    for figure in (result["figure"], result["detections"]):  # AP bars + loss curves; detections
        with open(figure, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "demo_tar_faster_rcnn.json").read_text())
    assert [r["model"] for r in saved["rows"]] == list(rows) and saved["iters"] == 2
    assert saved["precision"] == "bfloat16"
    for run in ("faster_rcnn_R18_FPN_student/iters2_seed0/plain_student", "tar_faster_rcnn/iters2_seed0/full_TAR"):
        rec = json.loads((out / run / "results.json").read_text())  # both students trained in bfloat16
        assert setup_cfg(os.path.join(ROOT, rec["config_file"]), rec["opts"]).SOLVER.AMP.ENABLED
    printed = capsys.readouterr().out
    assert "| TAR student |" in printed and "[demo] 4/4" in printed and "side by side" in printed
    # the console shows stages and results; pycocotools' prints and detectron2's tables go to the log
    log = (out / "demo_tar_faster_rcnn.log").read_text()
    assert "Loading and preparing results" not in printed and "Loading and preparing results" in log
    assert "Evaluation results for bbox" in log and "| TAR student |" in log and "[demo] 4/4" in log
    for run in ("faster_rcnn_R18_FPN_student/iters2_seed0/plain_student", "tar_faster_rcnn/iters2_seed0/full_TAR"):
        assert "Starting training from iteration 0" in (out / run / "log.txt").read_text()  # each worker's log
    assert os.path.isfile(out / "faster_rcnn_R18_FPN_student" / "iters2_seed0" / "plain_student" / "model_final.pth")
    assert os.path.isfile(out / "tar_faster_rcnn" / "iters2_seed0" / "full_TAR" / "model_final.pth")


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "--method"),
        (["--method", "tar", "--seeds", "0", "0"], "repeated seed"),
        (["--method", "tar", "--seeds", "-1"], "--seeds must be >= 0"),
        (["--method", "tar", "--iters", "0"], "--iters must be positive"),
        (["--method", "tar", "--config", "nope"], "not a config of tar"),
        (["--method", "tar", "SOLVER.MAX_ITER"], "KEY VALUE"),
        (["--method", "tar", "--evaluate-on", "shapes_nope"], "unknown split 'shapes_nope'; valid: shapes_mini_train"),
    ],
)
def test_ablation_bad_args(capsys, argv, message):
    _assert_usage_error(ablation.parse_args, argv, message, capsys)


def test_ablation_table_named_by_what_it_holds():
    """Each call's JSON is named by config, iterations, seeds, row set, opts and split,
    so a call with fewer seeds or rows does not overwrite an earlier, larger table."""
    def path(*argv):
        return ablation.table_path(ablation.parse_args(["--method", "tar", "--output", "out", *argv]))

    full = path("--iters", "1600", "--seeds", "0", "1", "2")
    assert full == os.path.join("out", "ablation_tar_faster_rcnn_1600it_seeds0-1-2.json")
    assert path("--iters", "1600", "--seeds", "0", "1", "2", "--evaluate-on", "shapes_tune") == \
        full.replace(".json", "_on_shapes_tune.json")
    two = path("--iters", "1600", "--seeds", "0", "1", "--rows", "full TAR", "plain student")
    assert two == path("--iters", "1600", "--seeds", "0", "1", "--rows", "plain student", "full TAR")
    others = [
        path("--iters", "800", "--seeds", "0", "1", "2"),
        path("--iters", "1600", "--seeds", "0"),
        path("--iters", "1600", "--seeds", "0", "1", "2", "--no-extra"),
        path("--iters", "1600", "--seeds", "0", "1", "2", "--baselines"),
        path("--iters", "1600", "--seeds", "0", "1", "2", "--", "DISTILL.TAR.CLS_WEIGHT", "2.0"),
        path("--iters", "1600", "--seeds", "0", "1", "--rows", "plain student"),
        two,
    ]
    assert len({full, *others}) == len(others) + 1
    assert re.fullmatch(r"ablation_tar_faster_rcnn_1600it_seeds0-1_[0-9a-f]{8}\.json", os.path.basename(two))


def test_ablation_rows_resolve_without_training(monkeypatch, frcnn_teacher_weights):
    """A row restating a default shares the full row's runs; a row naming an option the
    config lacks is skipped with a note; --baselines adds the other methods' full rows."""
    monkeypatch.setitem(setups.EXTRA_ROWS, "TAR", [
        ("linear decay", ["DISTILL.SCHEDULE.KIND", "linear"]),  # TAR's default for KIND ""
        ("no such option", ["DISTILL.TAR.NO_SUCH_OPTION", "1"]),
        ("no decay", ["DISTILL.SCHEDULE.KIND", "constant"]),
    ])
    args = ablation.parse_args(["--method", "tar", "--config", "tar_faster_rcnn_paper", "--baselines", "--iters", "1",
                                "--seeds", "0", "1", "--", *TINY])
    rows = ablation.plan(args)
    names = [r.name for r in rows]
    assert names[:5] == ["plain student", "+ feature", "+ classification", "+ regression", "full TAR"]
    assert "full FEATURE" in names and "full TBD" not in names  # baselines: same student architecture
    entries = {e["row"]: e for e in ablation.resolve(rows, args, frcnn_teacher_weights)}
    assert entries["full TAR, linear decay"]["same_as"] == "full TAR"
    assert "NO_SUCH_OPTION" in entries["full TAR, no such option"]["skipped"]
    assert "row_obj" in entries["full TAR, no decay"] and "row_obj" in entries["+ feature"]


@pytest.mark.slow
def test_ablation_tiny_run(tmp_path, capsys, monkeypatch, retina_teacher_weights):
    """Two seeds per row, mean ± sd per row, the teacher evaluated; TBD on RetinaNet."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "runs"
    argv = ["--method", "tbd", "--iters", "1", "--seeds", "0", "1", "--output", str(out),
            "--teacher-weights", retina_teacher_weights, "--rows", "plain student", "+ HD",
            "--", *TINY, "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"]
    summary = ablation.main(argv)
    rows = {r["row"]: r for r in summary["rows"]}
    assert list(rows) == ["plain student", "+ HD", "teacher"]
    for name in ("plain student", "+ HD"):
        r = rows[name]
        assert [s["seed"] for s in r["per_seed"]] == [0, 1]
        aps = [s["AP"] for s in r["per_seed"]]
        assert r["AP"] == pytest.approx(sum(aps) / 2) and r["AP_sd"] == pytest.approx(abs(aps[0] - aps[1]) / 2 ** 0.5)
        assert "harmonious_ratio" in r
    assert "DISTILL.TBD.TFD_WEIGHT 0.0" in rows["+ HD"]["per_seed"][0]["command"]
    assert "AP" in rows["teacher"]
    # each row against the plain student of the same seed, and the gap to the teacher it closes
    hd, plain = rows["+ HD"], rows["plain student"]
    diffs = [a["AP"] - b["AP"] for a, b in zip(hd["per_seed"], plain["per_seed"])]
    assert hd["vs_plain_per_seed"] == pytest.approx(diffs, nan_ok=True)
    assert hd["vs_plain"] == pytest.approx(sum(diffs) / 2, nan_ok=True)
    assert hd["better_every_seed"] == all(d > 0 for d in diffs)
    assert hd["gap_closed_pct"] == pytest.approx(
        stats.gap_closed(hd["AP"], plain["AP"], rows["teacher"]["AP"]), nan_ok=True)
    assert "vs_plain" not in plain
    written = list(out.glob("ablation_*.json"))  # named by config, iterations, seeds and a row/opts tag
    assert len(written) == 1 and re.fullmatch(r"ablation_tbd_retinanet_1it_seeds0-1_[0-9a-f]{8}\.json", written[0].name)
    assert json.loads(written[0].read_text())["seeds"] == [0, 1]
    printed = capsys.readouterr().out
    assert "| + HD |" in printed and "mean ± sample sd" in printed and "| vs plain per seed |" in printed
    hd_line = next(line for line in printed.splitlines() if line.startswith("| + HD |"))
    assert ", ".join(f"{s['AP']:.2f}" for s in hd["per_seed"]) in hd_line  # AP per seed


def test_ablation_compare_with_plain_by_hand():
    """Hand-computed: plain 10 / 12, a row 13 / 12 (+3, 0), teacher 30 -> gap (12.5 - 11) / 19."""
    table = [
        {"row": "plain student", "id": "plain_student", "AP": 11.0, "per_seed": [{"seed": 0, "AP": 10.0}, {"seed": 1, "AP": 12.0}]},
        {"row": "full X", "id": "full_X", "AP": 12.5, "per_seed": [{"seed": 0, "AP": 13.0}, {"seed": 1, "AP": 12.0}]},
        {"row": "full Y", "skipped": "needs DISTILL.Y"},
        {"row": "teacher", "id": "teacher", "AP": 30.0},
    ]
    ablation.compare_with_plain(table)
    x = table[1]
    assert x["vs_plain_per_seed"] == [3.0, 0.0] and x["vs_plain"] == 1.5
    assert x["vs_plain_sd"] == pytest.approx(2 ** 0.5 * 1.5)  # sample sd of 3 and 0
    assert x["better_every_seed"] is False  # not better on seed 1
    assert x["gap_closed_pct"] == pytest.approx(100 * 1.5 / 19)
    assert "vs_plain" not in table[0] and "vs_plain" not in table[2]


# ---- loss_gradients.py -----------------------------------------------------------
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
def test_loss_gradients_bad_args(capsys, argv, message):
    cfg = os.path.join(ROOT, "configs", "quickstart", "tar_faster_rcnn.yaml")
    _assert_usage_error(loss_gradients.parse_args, [a.replace("__CFG__", cfg) for a in argv], message, capsys)


def test_loss_gradients_tiny_run(tmp_path, capsys, frcnn_teacher_weights):
    cfg = os.path.join(ROOT, "configs", "quickstart", "tar_faster_rcnn_paper.yaml")
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
    ratios = result["grad_ratios"]  # against the detection losses, as DISTILL.DIAGNOSTICS logs them
    assert ratios["loss_tar_feat/backbone"] > 0 and ratios["loss_tar_feat/box_head"] == 0
    assert ratios["loss_tar_cls/box_head"] > 0 and not any(k.startswith("loss_cls") for k in ratios)
    assert rows["loss_rpn_cls"]["proposal_generator"] > 0 and rows["loss_rpn_cls"]["roi_heads"] == 0
    assert rows["loss_cls"]["roi_heads"] > 0 and rows["loss_cls"]["proposal_generator"] == 0
    assert json.loads(out.read_text())["losses"]["loss_tar_feat"]["backbone"] == pytest.approx(
        rows["loss_tar_feat"]["backbone"])
    # the paper config's gates, averaged over the batches: the classification and regression ones
    rates = result["gate_rates"]
    assert set(rates) == {"tar_cls_gate_rate", "tar_reg_gate_rate"}
    assert all(0.0 <= v <= 1.0 for v in rates.values())
    printed = capsys.readouterr().out
    assert "| loss_tar_feat |" in printed and "| tar_reg_gate_rate |" in printed


def test_loss_gradients_needs_a_distiller():
    with pytest.raises(SystemExit, match="needs a distiller config"):
        loss_gradients.main(["--config-file", os.path.join(ROOT, "configs", "quickstart",
                                                           "faster_rcnn_R18_FPN_student.yaml"), *SMALL])


# ---- teacher_seeds.py ------------------------------------------------------------
def test_teacher_seeds_defaults():
    a = teacher_seeds.parse_args([])
    # the discovered setups' teacher configs, each once
    assert a.teachers == ["faster_rcnn_R34_FPN_teacher", "retinanet_R34_FPN_teacher"]
    assert a.teacher_configs["retinanet_R34_FPN_teacher"] == "configs/quickstart/retinanet_R34_FPN_teacher.yaml"
    assert a.seeds == [0, 1, 2] and a.runs == "output/teachers"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--teachers", "resnet_teacher"], "--teachers: unknown resnet_teacher"),
        (["--seeds", "2", "2"], "repeated seed"),
        (["--seeds", "-3"], "--seeds must be >= 0"),
        (["SOLVER.MAX_ITER"], "KEY VALUE"),
        (["--eval-opts", "MODEL.RETINANET.SCORE_THRESH_TEST"], "--eval-opts must be KEY VALUE pairs"),
    ],
)
def test_teacher_seeds_bad_args(capsys, argv, message):
    _assert_usage_error(teacher_seeds.parse_args, argv, message, capsys)


@pytest.mark.slow
def test_teacher_seeds_tiny_run(tmp_path, capsys, monkeypatch, request):
    monkeypatch.chdir(ROOT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    out, runs = tmp_path / "teachers.json", tmp_path / "teachers"
    tiny = [*TINY, "SOLVER.MAX_ITER", "1"]
    argv = ["--teachers", "faster_rcnn_R34_FPN_teacher", "--seeds", "0", "1", "--runs", str(runs),
            "--output", str(out), *tiny]
    teacher_seeds.main(argv)
    r = json.loads(out.read_text())["teachers"]["faster_rcnn_R34_FPN_teacher"]
    assert [s["seed"] for s in r["per_seed"]] == [0, 1]
    aps = [s["AP"] for s in r["per_seed"]]
    assert r["mean"] == pytest.approx(sum(aps) / 2) and r["sd"] == pytest.approx(abs(aps[0] - aps[1]) / 2 ** 0.5)
    assert r["max_abs_dev"] == pytest.approx(abs(aps[0] - aps[1]) / 2)
    for s in r["per_seed"]:  # not the quickstart folder: the tiny opts make another config
        assert s["run"] == os.path.join(str(runs), "faster_rcnn_R34_FPN_teacher", f"seed{s['seed']}")
        assert f"SEED {s['seed']}" in s["command"]
    assert "| faster_rcnn_R34_FPN_teacher |" in capsys.readouterr().out

    # a folder trained with exactly this config is reused (as the quickstart teacher is), nothing trains;
    # with another seed the config differs and the run cache's own folder is used
    config, seed0 = "configs/quickstart/faster_rcnn_R34_FPN_teacher.yaml", r["per_seed"][0]["run"]
    results = os.path.join(seed0, "results.json")
    mtime = os.path.getmtime(results)
    rec = teacher_seeds.train_seed(config, 0, str(tmp_path / "elsewhere"), tiny, quickstart=seed0)
    assert rec["run"] == seed0 and os.path.getmtime(results) == mtime
    rec = teacher_seeds.train_seed(config, 1, str(runs), tiny, quickstart=seed0)
    assert rec["run"] == r["per_seed"][1]["run"] and rec["metrics"]["AP"] == pytest.approx(aps[1], nan_ok=True)

    # --eval-opts: the same trained teachers evaluated once more with test-time opts, nothing trains;
    # a score threshold no score passes leaves no detection, so AP is NaN while "as trained" keeps its value
    from benchmarks import runs as runs_module

    calls, real = [], runs_module.evaluate
    monkeypatch.setattr(runs_module, "evaluate", lambda c, o, w: calls.append((list(o), w)) or real(c, o, w))
    again = teacher_seeds.main(argv[:-len(tiny)] + ["--eval-opts", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "1.0",
                                                    "--", *tiny])
    assert again["eval_opts"] == ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "1.0"]
    r2 = again["teachers"]["faster_rcnn_R34_FPN_teacher"]
    assert os.path.getmtime(results) == mtime  # not retrained
    assert [s["as_trained"] for s in r2["per_seed"]] == pytest.approx(aps, nan_ok=True)
    assert all(math.isnan(s["AP"]) for s in r2["per_seed"]) and math.isnan(r2["mean"])
    assert [w for _, w in calls] == [os.path.join(s["run"], "model_final.pth") for s in r["per_seed"]]
    assert all(o[-2:] == ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "1.0"] for o, _ in calls)
    assert "as trained" in capsys.readouterr().out


def test_teacher_seeds_trains_the_quickstart_teacher_where_the_lab_finds_it(tmp_path, monkeypatch):
    """The config's own seed without opts is the quickstart teacher: it trains into the
    quickstart folder (where the demo, ablation and distill_gain look), setting aside
    what an unfinished run left there; another seed trains into the runs folder."""
    from benchmarks import runs as runs_module

    trained = []

    def fake_train(config_file, opts, output_dir, force=False):
        trained.append((list(opts), output_dir, force))
        return {"metrics": {"AP": 1.0}, "command": "fake", "fingerprint": "x"}

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(runs_module, "train_and_evaluate", fake_train)
    config = "configs/quickstart/faster_rcnn_R34_FPN_teacher.yaml"
    own_seed = setup_cfg(config).SEED
    quickstart = tmp_path / "quickstart"
    quickstart.mkdir()
    (quickstart / "last_checkpoint").write_text("model_0000099.pth")  # an interrupted run

    rec = teacher_seeds.train_seed(config, own_seed, str(tmp_path / "runs"), [], quickstart=str(quickstart))
    assert rec["run"] == str(quickstart) and trained[-1] == (["SEED", str(own_seed)], str(quickstart), True)
    assert (tmp_path / "quickstart.stale-1" / "last_checkpoint").read_text() == "model_0000099.pth"

    rec = teacher_seeds.train_seed(config, own_seed + 1, str(tmp_path / "runs"), [], quickstart=str(quickstart))
    folder = str(tmp_path / "runs" / "faster_rcnn_R34_FPN_teacher" / f"seed{own_seed + 1}")
    assert rec["run"] == folder and trained[-1] == (["SEED", str(own_seed + 1)], folder, False)


@pytest.mark.slow
def test_ablation_evaluate_on_reuses_the_runs(tmp_path, capsys, monkeypatch, retina_teacher_weights):
    """--evaluate-on: the runs of the default table, not retrained, evaluated on another
    split (every image of it), the teacher too; the evaluation is cached beside the run."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "runs"
    opts = [*TINY, "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"]
    argv = ["--method", "tbd", "--iters", "1", "--seeds", "0", "--output", str(out),
            "--teacher-weights", retina_teacher_weights, "--rows", "plain student"]
    on_train = ["--evaluate-on", "shapes_mini_train", "--", *opts]
    default = ablation.main(argv + ["--", *opts])
    assert default["dataset"] == "shapes_mini_val"
    run = default["rows"][0]["per_seed"][0]["run"]
    trained = os.path.getmtime(os.path.join(run, "results.json"))

    capsys.readouterr()  # the first call's training log
    console = io.StringIO()  # a console handler of detectron2's logger, as setup_logger installs one
    handler = logging.StreamHandler(console)
    logging.getLogger("detectron2").addHandler(handler)
    try:
        tune = ablation.main(argv + on_train)
    finally:
        logging.getLogger("detectron2").removeHandler(handler)
    assert tune["dataset"] == "shapes_mini_train"
    assert tune["rows"][0]["per_seed"][0]["run"] == run
    assert os.path.getmtime(os.path.join(run, "results.json")) == trained  # not retrained
    cached = json.loads(open(os.path.join(run, "eval_shapes_mini_train.json")).read())
    record = json.loads(open(os.path.join(run, "results.json")).read())
    assert cached["fingerprint"] == record["fingerprint"]
    assert cached["metrics"]["AP"] == tune["rows"][0]["AP"]
    predictions = json.loads(open(os.path.join(run, "eval_shapes_mini_train", "inference", "coco_instances_results.json")).read())
    from detectron2.data import DatasetCatalog

    assert {p["image_id"] for p in predictions} == {d["image_id"] for d in DatasetCatalog.get("shapes_mini_train")}
    expected = setups.evaluate_teacher(ablation.parse_args(argv).setup, retina_teacher_weights,
                                       opts + ["DATASETS.TEST", "('shapes_mini_train',)"])
    assert tune["rows"][-1]["row"] == "teacher" and tune["rows"][-1]["AP"] == pytest.approx(expected["AP"], nan_ok=True)
    assert os.path.isfile(ablation.table_path(ablation.parse_args(argv + on_train)))
    assert os.path.isfile(ablation.table_path(ablation.parse_args(argv + ["--", *opts])))  # the default table stays
    printed = capsys.readouterr().out
    assert "AP on shapes_mini_train" in printed
    # detectron2's evaluation tables (the run's and the teacher's) go to log files, not the console
    assert "Per-category bbox AP" in open(os.path.join(run, "eval_shapes_mini_train", "log.txt")).read()
    assert os.path.isfile(out / "teacher_eval_shapes_mini_train.log")
    assert os.path.isfile(out / "teacher_eval_shapes_mini_val.log")  # the default table's split
    assert "Per-category" not in console.getvalue() + printed
    assert f"{run}: AP " in printed and "teacher " in printed

    evaluated = os.path.getmtime(os.path.join(run, "eval_shapes_mini_train.json"))
    again = ablation.main(argv + on_train)
    assert os.path.getmtime(os.path.join(run, "eval_shapes_mini_train.json")) == evaluated  # cached
    assert again["rows"][0]["AP"] == tune["rows"][0]["AP"]


@pytest.mark.slow
def test_distill_gain_jobs_trains_in_worker_processes(tmp_path, monkeypatch, frcnn_teacher_weights):
    """--jobs 2: every run is trained in a worker process (training in this process is
    made to fail), the records are the same runs as one at a time would make (same
    seed, same weights up to float rounding of another thread count), and a failing run
    names its folder."""
    from d2_distill.engine import DistillTrainer

    monkeypatch.chdir(ROOT)
    argv = ["--methods", "tar", "--seeds", "0", "--iters", "1", "--teacher-weights", f"tar={frcnn_teacher_weights}"]
    distill_gain.main(argv + ["--runs", str(tmp_path / "one"), "--output", str(tmp_path / "one.json"), *TINY])

    def refuse(self):
        raise AssertionError("trained in the main process")

    monkeypatch.setattr(DistillTrainer, "train", refuse)
    two = distill_gain.main(argv + ["--jobs", "2", "--runs", str(tmp_path / "two"),
                                    "--output", str(tmp_path / "two.json"), *TINY])
    for s in two["configs"]["tar_faster_rcnn"]["per_seed"]:
        for key in ("plain_run", "distilled_run"):
            mine = torch.load(os.path.join(s[key], "model_final.pth"), weights_only=True)["model"]
            ref = torch.load(os.path.join(s[key].replace(str(tmp_path / "two"), str(tmp_path / "one")),
                                          "model_final.pth"), weights_only=True)["model"]
            assert mine.keys() == ref.keys()
            for k in ref:
                assert torch.allclose(mine[k].float(), ref[k].float(), atol=1e-4), (key, k)

    with pytest.raises(RuntimeError, match="iters1_seed0/full_TAR.*failed"):
        distill_gain.main(argv + ["--jobs", "2", "--runs", str(tmp_path / "bad"), "--output", str(tmp_path / "b.json"),
                                  *TINY, "DISTILL.TAR.PROPOSALS", "nonsense"])


def test_console_and_log_keeps_progress_and_warnings_on_the_console(tmp_path, capsys):
    """The demo's console: ETA lines, the lab's messages and warnings; the rest of
    detectron2's log and third-party prints go to the log file, which has everything."""
    import io
    import logging

    from benchmarks.runs import console_and_log, setup_logging

    setup_logging()
    screen = io.StringIO()
    handler = logging.StreamHandler(screen)
    d2 = logging.getLogger("detectron2")
    level = d2.level
    d2.addHandler(handler)
    d2.setLevel(logging.DEBUG)  # as setup_logger sets it (this test process may have set it up otherwise)
    try:
        for verbose in (False, True):
            with console_and_log(str(tmp_path / f"log{verbose}.txt"), verbose) as say:
                logging.getLogger("detectron2.utils.events").info("eta: 0:01:00  iter: 20")
                logging.getLogger("detectron2.engine.defaults").info("Model: RetinaNet(...)")
                logging.getLogger("detectron2.evaluation.coco_evaluation").warning("a real warning")
                print("Loading and preparing results...")  # as pycocotools does
                say("[demo] 1/4 teacher")
            log = (tmp_path / f"log{verbose}.txt").read_text()
            for line in ("eta: 0:01:00", "Model: RetinaNet", "a real warning", "[demo] 1/4"):
                assert line in log
            assert ("Loading and preparing" in log) is not verbose
            shown, printed = screen.getvalue(), capsys.readouterr().out
            assert "eta: 0:01:00" in shown and "a real warning" in shown and "[demo] 1/4" in printed
            assert ("Model: RetinaNet" in shown) is verbose and ("Loading and preparing" in printed) is verbose
            screen.seek(0), screen.truncate()
        logging.getLogger("detectron2.engine.defaults").info("after the demo")
        assert "after the demo" in screen.getvalue()  # the filter is gone once the demo returns
    finally:
        d2.removeHandler(handler)
        d2.setLevel(level)


def _children(pid: int):
    """Worker processes (multiprocessing's spawn children, not its resource tracker) of ``pid``."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(stat[:-4] + "cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"spawn_main" in cmd:
            found.append(int(stat.split("/")[2]))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the workers' parent-death signal is Linux's prctl")
@pytest.mark.slow
def test_jobs_workers_end_when_the_benchmark_is_killed(tmp_path, frcnn_teacher_weights):
    """A SIGKILL to the benchmark's pid alone (what a job queue or a timeout sends)
    ends its --jobs workers too, instead of leaving them training, unseen, into run
    folders that a rerun trains into as well."""
    import signal
    import subprocess
    import time

    runs = tmp_path / "runs"
    argv = ["--methods", "tar", "--seeds", "0", "--iters", "100000", "--jobs", "2", "--runs", str(runs),
            "--teacher-weights", f"tar={frcnn_teacher_weights}", "--output", str(tmp_path / "g.json"), *TINY]
    parent = subprocess.Popen([sys.executable, "-c", "import sys; from benchmarks import distill_gain; "
                               "distill_gain.main(sys.argv[1:])", *argv],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and parent.poll() is None and not glob.glob(str(runs / "*" / "*" / "*" / "*")):
            time.sleep(0.5)  # until a worker has begun writing into its run folder
        assert parent.poll() is None, "the benchmark ended before its workers started"
        workers = _children(parent.pid)
        assert workers and all(_alive(p) for p in workers)
        parent.kill()
        parent.wait()
        deadline = time.time() + 60
        while time.time() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.5)
        assert not [p for p in workers if _alive(p)]
    finally:
        parent.kill()
        for p in workers:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_ablation_variant_rows(capsys, frcnn_teacher_weights):
    """--variant NAME KEY VALUE ... adds a row of the config with those opts; its opts
    name the table; a malformed variant is a usage error."""
    argv = ["--method", "tar", "--rows", "plain student", "--iters", "1", "--seeds", "0",
            "--variant", "fw0.1", "DISTILL.TAR.FEAT_WEIGHT", "0.1",
            "--variant", "bounded", "DISTILL.TAR.REG_LOSS", "bounded", "DISTILL.TAR.REG_GATE", "none"]
    args = ablation.parse_args(argv)
    rows = ablation.plan(args)
    assert [r.name for r in rows] == ["plain student", "fw0.1", "bounded"]
    assert rows[2].opts == ["DISTILL.TAR.REG_LOSS", "bounded", "DISTILL.TAR.REG_GATE", "none"]
    assert rows[1].config == rows[2].config == args.setup.config
    entries = {e["row"]: e for e in ablation.resolve(rows, args, frcnn_teacher_weights)}
    assert "row_obj" in entries["fw0.1"] and "row_obj" in entries["bounded"]
    other = ablation.parse_args(argv[:-6] + ["--variant", "bounded", "DISTILL.TAR.REG_LOSS", "teacher"])
    assert ablation.table_path(args) != ablation.table_path(other)
    _assert_usage_error(ablation.parse_args, ["--method", "tar", "--variant", "x", "DISTILL.TAR.FEAT_WEIGHT"],
                        "--variant needs a name and KEY VALUE pairs", capsys)


def test_demo_draws_one_detection_per_place():
    """The detections picture: above the score threshold, the best box of each place
    (class-agnostic NMS), so a lower-scored other class does not cover it."""
    import numpy as np

    det = {"boxes": np.array([[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10]], dtype=np.float32),
           "scores": np.array([0.9, 0.5, 0.4, 0.2], dtype=np.float32), "classes": np.array([1, 2, 3, 4])}
    assert demo.drawn(det, 0.3).tolist() == [0, 2]
    assert demo.drawn(det, 0.95).tolist() == []
    assert sorted(demo.drawn(det, 0.1, iou=0.99).tolist()) == [0, 1, 2]  # box 3 duplicates box 0 exactly


@pytest.mark.parametrize("config, iters", [("tar_faster_rcnn.yaml", 1600), ("tbd_retinanet.yaml", 1600)])
def test_recommended_config_alone_is_the_reported_run(config, iters):
    """`train_net.py --config-file <recommended>` with no opts trains what the lab's
    gain table trained for seed 0 at the README's schedule: the merged configs differ
    only in where they write and in the lab's extra evaluator."""
    from d2_distill.engine import setup_cfg

    path = os.path.join(QS_DIR, config)
    alone = setup_cfg(path)
    lab_run = setup_cfg(path, setups.schedule_opts(iters, 0) + setups.EVAL_OPTS)
    assert alone.SOLVER.MAX_ITER == iters
    assert changed_keys(alone, lab_run) <= {"DISTILL.EVAL.HARMONY"}
