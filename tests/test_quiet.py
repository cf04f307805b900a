"""d2_distill.quiet: ``import d2_distill`` prints none of detectron2's known
deprecation warnings and leaves the program's warning filters as they were; the
entry points (train_net.py, the lab) hide them (torch.jit.script, torch.meshgrid,
pkg_resources) and torch.fx's logged is_fx_tracing notice for the whole run, and
nothing else."""
import pytest
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
import logging
import torch.fx._symbolic_trace as fx_trace
fx_trace.is_fx_tracing_warning()  # what a detectron2 model's first traced call logs
logging.getLogger("torch.fx._symbolic_trace").warning("another torch.fx notice")
"""


def _stderr(prelude: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run([sys.executable, "-W", "default", "-c", SCRIPT.format(prelude=prelude)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.slow
def test_importing_the_library_is_quiet_and_keeps_the_filters():
    code = ("import warnings; before = list(warnings.filters); import d2_distill; "
            "assert warnings.filters == before, 'filters changed'")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_entry_points_silence_detectron2s_known_deprecations_only():
    noisy = _stderr("")  # the library changes no warning filter: a model build still warns
    assert "pkg_resources is deprecated" in noisy
    assert "d2_distill own warning" in noisy
    assert "is_fx_tracing will return true" in noisy and "another torch.fx notice" in noisy

    for prelude in ("import benchmarks.demo  # the lab's import path installs the filters",
                    "from d2_distill.quiet import silence_third_party_warnings; silence_third_party_warnings()"):
        _assert_quiet(_stderr(prelude))


def _assert_quiet(quiet: str) -> None:
    lines = [line for line in quiet.splitlines() if "Warning:" in line]
    known = ("torch/jit/_script.py", "torch.meshgrid", "pkg_resources is deprecated")
    assert not [line for line in lines if any(k in line for k in known)], lines
    assert any("d2_distill own warning" in line for line in lines), quiet  # our own warnings stay visible
    assert any("said someone else" in line for line in lines), quiet  # matched by message and module
    assert "is_fx_tracing will return true" not in quiet  # torch.fx's logged notice is dropped ...
    assert "another torch.fx notice" in quiet  # ... and only that record of its logger


def test_repository_configs_are_plain_yaml(caplog):
    """Every config of the repository loads with yaml.safe_load: fvcore falls back
    to yaml.unsafe_load (and says so) only for files with Python tags."""
    import glob

    from d2_distill.engine import setup_cfg

    files = sorted(glob.glob(os.path.join(ROOT, "configs", "quickstart", "*.yaml")))
    assert len(files) >= 10
    with caplog.at_level("WARNING", logger="fvcore.common.config"):
        for f in files:
            setup_cfg(f)
    assert "unsafe_load" not in caplog.text
