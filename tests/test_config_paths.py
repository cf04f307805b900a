"""DISTILL.TEACHER.CONFIG_FILE resolves like ``_BASE_``: beside the config file that
names it (the config or one of its bases), then from the working directory, then
from detectron2's model zoo."""
import os

import pytest

from d2_distill.engine import setup_cfg
from d2_distill.modeling.teacher import resolve_config_file


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_teacher_config_is_found_beside_the_file_that_names_it(tmp_path, monkeypatch):
    _write(tmp_path / "a" / "teacher.yaml", "MODEL:\n  META_ARCHITECTURE: GeneralizedRCNN\n")
    _write(tmp_path / "a" / "base.yaml", "DISTILL:\n  TEACHER:\n    CONFIG_FILE: teacher.yaml\n")
    child = _write(tmp_path / "b" / "child.yaml", "_BASE_: ../a/base.yaml\n")
    _write(tmp_path / "b" / "other_teacher.yaml", "MODEL:\n  META_ARCHITECTURE: GeneralizedRCNN\n")
    override = _write(tmp_path / "b" / "override.yaml",
                      "_BASE_: ../a/base.yaml\nDISTILL:\n  TEACHER:\n    CONFIG_FILE: other_teacher.yaml\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # outside the configs' folders: an absolute path comes back
    assert setup_cfg(child).DISTILL.TEACHER.CONFIG_FILE == str(tmp_path / "a" / "teacher.yaml")
    assert setup_cfg(override).DISTILL.TEACHER.CONFIG_FILE == str(tmp_path / "b" / "other_teacher.yaml")
    monkeypatch.chdir(tmp_path)  # below the working directory: a relative path, as the user wrote paths
    assert setup_cfg(child).DISTILL.TEACHER.CONFIG_FILE == os.path.join("a", "teacher.yaml")
    # a value given as an opt is the user's, relative to the working directory, untouched
    assert setup_cfg(child, ["DISTILL.TEACHER.CONFIG_FILE", "b/other_teacher.yaml"]).DISTILL.TEACHER.CONFIG_FILE \
        == "b/other_teacher.yaml"


def test_teacher_config_falls_back_to_cwd_and_model_zoo(tmp_path, monkeypatch):
    _write(tmp_path / "cwd_teacher.yaml", "MODEL:\n  META_ARCHITECTURE: GeneralizedRCNN\n")
    cfg = _write(tmp_path / "cfgs" / "s.yaml", "DISTILL:\n  TEACHER:\n    CONFIG_FILE: cwd_teacher.yaml\n")
    zoo = _write(tmp_path / "cfgs" / "z.yaml",
                 "DISTILL:\n  TEACHER:\n    CONFIG_FILE: COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml\n")
    monkeypatch.chdir(tmp_path)
    name = setup_cfg(cfg).DISTILL.TEACHER.CONFIG_FILE
    assert name == "cwd_teacher.yaml" and resolve_config_file(name) == "cwd_teacher.yaml"
    zoo_name = setup_cfg(zoo).DISTILL.TEACHER.CONFIG_FILE
    assert resolve_config_file(zoo_name).endswith("faster_rcnn_R_101_FPN_3x.yaml")
    with pytest.raises(FileNotFoundError, match=r"DISTILL.TEACHER.CONFIG_FILE='nope.yaml' not found; tried: .*nope.yaml; "
                                                r"detectron2 model zoo entry 'nope.yaml'"):
        resolve_config_file("nope.yaml")
