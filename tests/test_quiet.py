"""benchmarks.quiet: the lab's entry points hide detectron2's known deprecation
warnings (torch.jit.script, torch.meshgrid, pkg_resources), and nothing else."""
import os
import subprocess
import sys

from helpers import ROOT

# what detectron2's imports and a model build emit, then a warning of our own and
# look-alikes from elsewhere, which must stay visible
SCRIPT = """
{prelude}
import warnings
import d2_distill
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2 import model_zoo  # imports pkg_resources
cfg = get_cfg(); cfg.MODEL.DEVICE = "cpu"
build_model(cfg)  # Faster R-CNN: anchor generator (meshgrid), jit-scripted helpers
exec(compile("warnings.warn('d2_distill own warning', FutureWarning)", "d2_distill/own.py", "exec"),
     {{"__name__": "d2_distill.own", "warnings": warnings}})
warnings.warn("`torch.jit.script` is deprecated, said someone else", FutureWarning)
"""


def _stderr(prelude: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run([sys.executable, "-W", "default", "-c", SCRIPT.format(prelude=prelude)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_the_lab_silences_detectron2s_known_deprecations_only():
    noisy = _stderr("")  # the library alone changes no warning filter
    assert "torch/jit/_script.py" in noisy and "FutureWarning: `torch.jit.script` is deprecated" in noisy
    assert "d2_distill own warning" in noisy and "pkg_resources is deprecated" in noisy

    quiet = _stderr("import benchmarks.demo  # the demo's import path installs the filters")
    lines = [line for line in quiet.splitlines() if "Warning:" in line]
    known = ("torch/jit/_script.py", "torch.meshgrid", "pkg_resources is deprecated")
    assert not [line for line in lines if any(k in line for k in known)], lines
    assert any("d2_distill own warning" in line for line in lines), quiet  # our own warnings stay visible
    assert any("said someone else" in line for line in lines), quiet  # matched by message and module


def test_unsafe_load_notice_only_for_files_outside_the_repositorys_configs(tmp_path, caplog):
    """The RetinaNet configs' YAML eval tag makes fvcore warn on every read; the lab
    trusts this repository's configs/ and nothing else."""
    import shutil

    import benchmarks  # noqa: F401  (installs the filters)
    from d2_distill.engine import setup_cfg

    repo_cfg = os.path.join(ROOT, "configs", "quickstart", "retinanet_R18_FPN_student.yaml")
    elsewhere = tmp_path / "configs"
    shutil.copytree(os.path.join(ROOT, "configs", "quickstart"), elsewhere)
    with caplog.at_level("WARNING", logger="fvcore.common.config"):
        setup_cfg(repo_cfg)
        assert "unsafe_load" not in caplog.text
        setup_cfg(str(elsewhere / "retinanet_R18_FPN_student.yaml"))
    assert f"Loading config {elsewhere}" in caplog.text and "unsafe_load" in caplog.text
