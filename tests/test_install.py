"""The package as a user installs it: a non-editable install into a folder of its
own, and ``train_net.py`` copied into the user's project, run from there on the
user's own configs outside this repository (a teacher config named beside the
student's, as ``_BASE_`` is)."""
import os
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, cfg_for

pytestmark = pytest.mark.slow


def test_installed_package_trains_a_users_config_outside_the_repository(tmp_path, frcnn_teacher_weights):
    target, src = tmp_path / "site", tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):  # a copy: the build leaves nothing in the clone
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "d2_distill"), src / "d2_distill",
                    ignore=shutil.ignore_patterns("__pycache__"))
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                          "--target", str(target), str(src)], capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    assert (target / "d2_distill" / "quiet.py").is_file() and not (target / "benchmarks").exists()

    project = tmp_path / "my_project"
    (project / "configs").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "train_net.py"), project / "train_net.py")
    teacher = cfg_for("faster_rcnn_R34_FPN_teacher.yaml")
    (project / "configs" / "my_teacher.yaml").write_text(teacher.dump())
    student = cfg_for("tar_faster_rcnn.yaml", iters=2).clone()
    student.defrost()
    student.DISTILL.TEACHER.CONFIG_FILE = "my_teacher.yaml"  # beside the student's config
    student.DISTILL.TEACHER.WEIGHTS = frcnn_teacher_weights
    student.OUTPUT_DIR = "out"
    (project / "configs" / "my_student.yaml").write_text(student.dump())

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["PYTHONPATH"] = str(target)
    where = subprocess.run([sys.executable, "-c", "import d2_distill; print(d2_distill.__file__)"],
                           cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr
    run = subprocess.run([sys.executable, "train_net.py", "--config-file", "configs/my_student.yaml"],
                         cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert (project / "out" / "model_final.pth").is_file()
    assert "No module named" not in run.stderr
