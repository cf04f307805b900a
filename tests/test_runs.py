"""benchmarks.runs: the run cache the demo and the benchmarks share.

A cached run or teacher is reused only when it was made with the same merged
config (however its config file and opts spelled it) and (for a distiller) the same teacher checkpoint bytes and d2_distill
sources; a stale one is moved aside, never overwritten or reused."""
import json
import logging
import os
import shutil

import pytest
import torch

from d2_distill.engine import setup_cfg
from benchmarks import runs
from benchmarks.runs import ensure_trained, fingerprint, train_and_evaluate
from helpers import SMALL, qs

STUDENT = qs("faster_rcnn_R18_FPN_student.yaml")
TAR = qs("tar_faster_rcnn.yaml")
ONE_ITER = list(SMALL) + ["SOLVER.MAX_ITER", "1", "SOLVER.STEPS", "()"]


def test_fingerprint_ignores_device_and_output_dir_but_not_the_config():
    base = fingerprint(setup_cfg(STUDENT, ONE_ITER))
    assert fingerprint(setup_cfg(STUDENT, ONE_ITER + ["OUTPUT_DIR", "/elsewhere"])) == base
    assert fingerprint(setup_cfg(STUDENT, ONE_ITER + ["MODEL.DEVICE", "cuda"])) == base  # falls back to cpu here
    assert fingerprint(setup_cfg(STUDENT, ONE_ITER + ["SEED", "7"])) != base
    assert fingerprint(setup_cfg(STUDENT, ONE_ITER + ["SOLVER.BASE_LR", "0.03"])) != base


def test_fingerprint_survives_the_config_dump(tmp_path):
    """train_net.py dumps config.yaml (with YAML aliases and lists for tuples);
    read back, it must give the same fingerprint as the config it came from."""
    for name in ("faster_rcnn_R34_FPN_teacher.yaml", "retinanet_R34_FPN_teacher.yaml", "tar_faster_rcnn.yaml"):
        cfg = setup_cfg(qs(name))
        dumped = tmp_path / f"{name}.dump.yaml"
        dumped.write_text(cfg.dump())
        assert fingerprint(setup_cfg(str(dumped))) == fingerprint(cfg), name


def test_fingerprint_follows_the_teacher_bytes(tmp_path, frcnn_teacher_weights):
    teacher = tmp_path / "teacher.pth"
    shutil.copy(frcnn_teacher_weights, teacher)
    opts = ONE_ITER + ["DISTILL.TEACHER.WEIGHTS", str(teacher)]
    before = fingerprint(setup_cfg(TAR, opts))
    assert fingerprint(setup_cfg(TAR, opts)) == before
    with open(teacher, "ab") as f:  # same path, other bytes: a retrained teacher
        f.write(b"\0")
    assert fingerprint(setup_cfg(TAR, opts)) != before


@pytest.mark.slow
def test_stale_distilled_run_is_set_aside_and_redone(tmp_path, frcnn_teacher_weights):
    teacher = tmp_path / "teacher.pth"
    shutil.copy(frcnn_teacher_weights, teacher)
    out = str(tmp_path / "run")
    opts = ONE_ITER + ["DISTILL.TEACHER.WEIGHTS", str(teacher)]
    first = train_and_evaluate(TAR, opts, out)
    assert first["fingerprint"] == fingerprint(setup_cfg(TAR, opts + ["OUTPUT_DIR", out]))
    results = os.path.join(out, "results.json")
    mtime = os.path.getmtime(results)
    assert train_and_evaluate(TAR, opts, out)["fingerprint"] == first["fingerprint"]
    assert os.path.getmtime(results) == mtime  # reused, not retrained

    # the teacher is retrained at the same path: the cached student is stale
    state = torch.load(teacher, map_location="cpu", weights_only=True)
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, teacher)
    again = train_and_evaluate(TAR, opts, out)
    assert again["fingerprint"] != first["fingerprint"]
    with open(os.path.join(out + ".stale-1", "results.json")) as f:
        assert json.load(f)["fingerprint"] == first["fingerprint"]  # the old run is kept
    assert os.path.isfile(os.path.join(out + ".stale-1", "model_final.pth"))


def _no_training(*args, **kwargs):
    raise AssertionError("trained although a run with the same fingerprint was there")


@pytest.mark.slow
def test_a_run_is_reused_by_fingerprint_however_its_config_is_spelled(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    first = train_and_evaluate(STUDENT, ONE_ITER, out)
    restated = ONE_ITER + ["SOLVER.BASE_LR", str(setup_cfg(STUDENT).SOLVER.BASE_LR)]  # the default, spelled out
    monkeypatch.setattr(runs, "DistillTrainer", _no_training)
    again = train_and_evaluate(STUDENT, restated, out)
    assert again["metrics"]["AP"] == first["metrics"]["AP"] and again["fingerprint"] == first["fingerprint"]
    assert again["opts"] == restated + ["OUTPUT_DIR", out]  # restated for this caller
    assert "SOLVER.BASE_LR" in again["command"] and again["reused_from"] == first["command"]

    # another config in that folder: the old run is set aside (it used to be trained over)
    monkeypatch.undo()
    other = train_and_evaluate(STUDENT, ONE_ITER + ["SOLVER.BASE_LR", "0.005"], out)
    assert other["fingerprint"] != first["fingerprint"]
    with open(os.path.join(out + ".stale-1", "results.json")) as f:
        assert json.load(f)["fingerprint"] == first["fingerprint"]


@pytest.mark.slow
def test_a_twin_in_another_folder_is_linked_not_retrained(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    a, b, c = str(root / "x" / "a"), str(root / "y" / "b"), str(root / "z" / "c")
    first = train_and_evaluate(STUDENT, ONE_ITER, a, twins_under=str(root))
    assert "reused_from" not in first
    restated = ONE_ITER + ["SOLVER.BASE_LR", str(setup_cfg(STUDENT).SOLVER.BASE_LR)]
    monkeypatch.setattr(runs, "DistillTrainer", _no_training)
    os.makedirs(b)
    with open(os.path.join(b, "metrics.json"), "w") as f:  # left by an unfinished run
        f.write("partial\n")
    twin = train_and_evaluate(STUDENT, restated, b, twins_under=str(root))
    with open(os.path.join(b + ".stale-1", "metrics.json")) as f:
        assert f.read() == "partial\n"  # set aside, not mixed into the adopted run
    assert twin["reused_from"] == a and twin["metrics"]["AP"] == first["metrics"]["AP"]
    assert twin["opts"][-2:] == ["OUTPUT_DIR", b]
    with open(os.path.join(b, "model_final.pth"), "rb") as f1, open(os.path.join(a, "model_final.pth"), "rb") as f2:
        assert f1.read() == f2.read()
    with open(os.path.join(b, "results.json")) as f:
        saved = json.load(f)
    assert saved["reused_from"] == a and saved["opts"] == twin["opts"] and saved["command"] == twin["command"]
    assert train_and_evaluate(STUDENT, restated, b)["reused_from"] == a  # the next call reuses b itself

    # without twins_under, or for another config, nothing is borrowed
    with pytest.raises(AssertionError, match="trained although"):
        train_and_evaluate(STUDENT, ONE_ITER, c)
    with pytest.raises(AssertionError, match="trained although"):
        train_and_evaluate(STUDENT, ONE_ITER + ["SEED", "7"], c, twins_under=str(root))
    assert runs.find_twin(str(root), first["fingerprint"], skip=a) == b


@pytest.mark.slow
def test_evaluate_writes_into_a_scratch_folder_unless_told_where(tmp_path, monkeypatch):
    """A teacher's evaluation (the lab's) must not write beside its checkpoint,
    where another process may be evaluating the same teacher."""
    out = str(tmp_path / "run")
    train_and_evaluate(STUDENT, ONE_ITER, out)
    seen = []
    real_test = runs.DistillTrainer.test

    def recording(cfg, model):
        seen.append((cfg.OUTPUT_DIR, os.path.isdir(cfg.OUTPUT_DIR)))
        return real_test(cfg, model)

    monkeypatch.setattr(runs.DistillTrainer, "test", recording)
    metrics = runs.evaluate(STUDENT, ONE_ITER, os.path.join(out, "model_final.pth"))
    assert "AP" in metrics
    scratch, existed = seen[0]
    assert existed and scratch != setup_cfg(STUDENT).OUTPUT_DIR and not os.path.exists(scratch)  # removed after
    told = str(tmp_path / "eval")
    runs.evaluate(STUDENT, ONE_ITER + ["OUTPUT_DIR", told], os.path.join(out, "model_final.pth"))
    assert seen[1][0] == told


@pytest.mark.slow
def test_ensure_trained_reuses_only_a_checkpoint_of_the_same_config(tmp_path):
    out = str(tmp_path / "teacher")
    opts = ONE_ITER + ["OUTPUT_DIR", out]
    final = ensure_trained(STUDENT, opts)
    assert final == os.path.join(out, "model_final.pth")
    mtime = os.path.getmtime(final)
    assert ensure_trained(STUDENT, opts) == final and os.path.getmtime(final) == mtime

    # trained by train_net.py (no results.json, a config.yaml dump): still recognised
    os.remove(os.path.join(out, "results.json"))
    (tmp_path / "teacher" / "config.yaml").write_text(setup_cfg(STUDENT, opts).dump())
    assert ensure_trained(STUDENT, opts) == final and os.path.getmtime(final) == mtime

    # the YAML changed (here: an opt) since the checkpoint was trained: set aside, retrained
    changed = ensure_trained(STUDENT, opts + ["SOLVER.BASE_LR", "0.005"])
    assert changed == final and os.path.isfile(final)
    assert os.path.isfile(os.path.join(out + ".stale-1", "model_final.pth"))
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["fingerprint"] == fingerprint(setup_cfg(STUDENT, opts + ["SOLVER.BASE_LR", "0.005"]))


def test_ensure_trained_without_a_record_reuses_with_a_warning(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("d2_distill"), "propagate", True)  # setup_logging turns it off
    out = tmp_path / "teacher"
    out.mkdir()
    (out / "model_final.pth").write_bytes(b"not checked")
    with caplog.at_level("WARNING", logger=runs.logger.name):
        path = ensure_trained(STUDENT, ONE_ITER + ["OUTPUT_DIR", str(out)])
    assert path == str(out / "model_final.pth")
    assert "no results.json or config.yaml" in caplog.text


def test_fingerprint_of_distilled_runs_follows_the_code(monkeypatch, frcnn_teacher_weights):
    """Changed distillation code redoes distilled runs; plain detectron2 runs are unaffected."""
    tar_cfg = setup_cfg(TAR, ONE_ITER + ["DISTILL.TEACHER.WEIGHTS", frcnn_teacher_weights])
    plain_cfg = setup_cfg(STUDENT, ONE_ITER)
    before = fingerprint(tar_cfg), fingerprint(plain_cfg)
    monkeypatch.setattr(runs, "source_digest", lambda: "edited sources")
    assert fingerprint(tar_cfg) != before[0]
    assert fingerprint(plain_cfg) == before[1]


def test_source_digest_walks_the_whole_package(tmp_path):
    """Every .py file under the package is hashed, found by walking it: a module in a
    new sub-package changes the digest without anyone listing the folder."""
    import d2_distill

    pkg = os.path.dirname(d2_distill.__file__)
    found = {os.path.relpath(p, pkg) for p in runs.package_sources(pkg)}
    on_disk = {os.path.relpath(os.path.join(d, f), pkg) for d, _, fs in os.walk(pkg) for f in fs
               if f.endswith(".py") and "__pycache__" not in d}
    assert found == on_disk
    assert {"export.py", "engine/trainer.py", os.path.join("methods", "tar.py")} <= found

    root = tmp_path / "pkg"
    (root / "methods").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "methods" / "tar.py").write_text("x = 1\n")
    digest = runs.source_digest.__wrapped__  # uncached
    before = digest(str(root))
    (root / "brand_new").mkdir()
    (root / "brand_new" / "pkd.py").write_text("y = 2\n")
    assert digest(str(root)) != before
    (root / "brand_new" / "notes.txt").write_text("not code")
    after = digest(str(root))
    (root / "brand_new" / "notes.txt").write_text("other text")
    assert digest(str(root)) == after  # only .py files count


@pytest.mark.slow
def test_a_run_is_a_function_of_its_seed_not_of_the_process_history(tmp_path):
    """Two runs of the same config and SEED in one process, with RNG drawn in between,
    train the same weights (train_net.py seeds through default_setup; so must the cache)."""
    opts = ONE_ITER + ["SEED", "3"]
    train_and_evaluate(STUDENT, opts, str(tmp_path / "a"))
    torch.rand(1000)  # whatever ran before in the process
    import numpy as np

    np.random.rand(1000)
    train_and_evaluate(STUDENT, opts, str(tmp_path / "b"))
    a, b = (torch.load(tmp_path / d / "model_final.pth", map_location="cpu", weights_only=True)["model"]
            for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_teacher_is_evaluated_once_per_checkpoint_and_setting(tmp_path, monkeypatch, frcnn_teacher_weights):
    """evaluate_cached (the demo's and the benchmarks' teacher evaluation) remembers
    its metrics beside the checkpoint; other bytes or another setting evaluate again."""
    from d2_distill.engine import DistillTrainer

    teacher = tmp_path / "teacher" / "model_final.pth"
    teacher.parent.mkdir()
    shutil.copy(frcnn_teacher_weights, teacher)
    config = qs("faster_rcnn_R34_FPN_teacher.yaml")
    opts = list(SMALL) + ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    calls = []
    real_test = DistillTrainer.test.__func__

    def counting_test(cls, cfg, model, evaluators=None):
        calls.append(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST)
        return real_test(cls, cfg, model, evaluators)

    monkeypatch.setattr(DistillTrainer, "test", classmethod(counting_test))
    first = runs.evaluate_cached(config, opts, str(teacher))
    assert "AP" in first and len(calls) == 1
    assert len(list(teacher.parent.glob("eval_*.json"))) == 1
    again = runs.evaluate_cached(config, opts, str(teacher))
    assert json.dumps(again, sort_keys=True) == json.dumps(first, sort_keys=True)  # NaN-safe equality
    assert len(calls) == 1  # remembered, not evaluated again
    runs.evaluate_cached(config, opts + ["MODEL.ROI_HEADS.NMS_THRESH_TEST", "0.4"], str(teacher))
    assert len(calls) == 2  # another setting
    with open(teacher, "ab") as f:  # same path, other bytes: a retrained teacher
        f.write(b"\0")
    runs.evaluate_cached(config, opts, str(teacher))
    assert len(calls) == 3


def test_a_plain_runs_fingerprint_ignores_distillation_options():
    """A new DISTILL option (or another value of one) cannot retrain a teacher or a plain
    student, which never read it; DISTILL.EVAL (its evaluation) and any distiller's
    DISTILL options still count."""
    plain = qs("faster_rcnn_R18_FPN_student.yaml")
    base = fingerprint(setup_cfg(plain))
    assert fingerprint(setup_cfg(plain, ["DISTILL.TAR.TEMPERATURE", "32.0", "DISTILL.LOG_PERIOD", "5"])) == base
    assert fingerprint(setup_cfg(plain, ["DISTILL.EVAL.HARMONY", "True"])) != base
    assert fingerprint(setup_cfg(TAR, ["DISTILL.TAR.TEMPERATURE", "31.0"])) != fingerprint(setup_cfg(TAR))
