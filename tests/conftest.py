"""Shared pytest fixtures of the d2_distill test suite.

* ``_test_session_env`` (autouse, session): points ``$D2_DISTILL_DATA`` at a
  session temporary folder unless the caller already set it (CI may set it to
  reuse a cache of generated datasets), and sets torch to $D2_DISTILL_TEST_THREADS
  threads (default 1).
* ``make_random_checkpoint(config_file, out_dir)``: a plain detectron2 model with
  its random initialisation, saved as ``out_dir/model_final.pth`` -- a stand-in
  for a trained teacher (the checkpoint format is what matters, not accuracy).
* ``random_teacher``: session fixture, ``random_teacher(config_name) -> path``;
  ``config_name`` is a file under ``configs/quickstart/`` or any config path.
  Each config's checkpoint is made once per session.
* ``frcnn_teacher_weights`` / ``retina_teacher_weights``: the random checkpoints
  of the quickstart teachers ``faster_rcnn_R34_FPN_teacher.yaml`` and
  ``retinanet_R34_FPN_teacher.yaml`` (the teachers of ``tar_faster_rcnn.yaml`` /
  ``feature_faster_rcnn.yaml`` and ``tbd_retinanet.yaml``).
"""
from __future__ import annotations

import os

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO_ROOT, "configs", "quickstart")


@pytest.fixture(scope="session", autouse=True)
def _test_session_env(tmp_path_factory):
    """$D2_DISTILL_DATA -> a session tmp dir (unless set by the caller); torch threads =
    $D2_DISTILL_TEST_THREADS (default 1: the tiny test models gain nothing from more)."""
    set_here = "D2_DISTILL_DATA" not in os.environ
    if set_here:
        os.environ["D2_DISTILL_DATA"] = str(tmp_path_factory.mktemp("d2_distill_data"))
    torch.set_num_threads(int(os.environ.get("D2_DISTILL_TEST_THREADS", "1")))
    yield
    if set_here:
        os.environ.pop("D2_DISTILL_DATA", None)


def quickstart_config(name: str) -> str:
    """``name`` if it is an existing path, else ``configs/quickstart/<name>``."""
    return name if os.path.isfile(name) else os.path.join(QUICKSTART, name)


def make_random_checkpoint(config_file: str, out_dir) -> str:
    """Build a plain detectron2 model from ``config_file`` (on CPU, random weights)
    and save it with DetectionCheckpointer as ``out_dir/model_final.pth``; return that path."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from d2_distill.engine import setup_cfg

    cfg = setup_cfg(config_file, ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)  # the same random teacher in every session
    model = build_model(cfg)
    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    DetectionCheckpointer(model, save_dir=out_dir).save("model_final")
    return os.path.join(out_dir, "model_final.pth")


@pytest.fixture(scope="session")
def random_teacher(tmp_path_factory):
    """``random_teacher(config_name) -> checkpoint path``, made once per config per session."""
    cache: dict[str, str] = {}

    def get(config_name: str) -> str:
        config_file = os.path.abspath(quickstart_config(config_name))
        if config_file not in cache:
            stem = os.path.splitext(os.path.basename(config_file))[0]
            cache[config_file] = make_random_checkpoint(config_file, tmp_path_factory.mktemp(stem))
        return cache[config_file]

    return get


@pytest.fixture(scope="session")
def frcnn_teacher_weights(random_teacher) -> str:
    """Random checkpoint of configs/quickstart/faster_rcnn_R34_FPN_teacher.yaml."""
    return random_teacher("faster_rcnn_R34_FPN_teacher.yaml")


@pytest.fixture(scope="session")
def retina_teacher_weights(random_teacher) -> str:
    """Random checkpoint of configs/quickstart/retinanet_R34_FPN_teacher.yaml."""
    return random_teacher("retinanet_R34_FPN_teacher.yaml")
