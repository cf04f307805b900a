"""Training and evaluation through train_net.py's own entry point."""
import importlib.util
import os

import pytest
from detectron2.engine import default_argument_parser

from helpers import ROOT, SMALL, qs


def _train_net():
    spec = importlib.util.spec_from_file_location("train_net", os.path.join(ROOT, "train_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("config,amp", [("faster_rcnn_R18_FPN_student.yaml", False),
                                        ("retinanet_R18_FPN_student.yaml", False),
                                        ("faster_rcnn_R18_FPN_student.yaml", True)])  # bfloat16 autocast on CPU
@pytest.mark.slow
def test_train_then_eval_only(tmp_path, config, amp):
    train_net = _train_net()
    opts = SMALL + ["SOLVER.MAX_ITER", "3", "OUTPUT_DIR", str(tmp_path), "SOLVER.AMP.ENABLED", str(amp),
                    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"]
    args = default_argument_parser().parse_args(["--config-file", qs(config), *opts])
    train_net.main(args)  # trains 3 iterations, then the final evaluation
    final = tmp_path / "model_final.pth"
    assert final.is_file() and (tmp_path / "metrics.json").is_file()

    args = default_argument_parser().parse_args(
        ["--config-file", qs(config), "--eval-only", *opts, "MODEL.WEIGHTS", str(final)]
    )
    results = train_net.main(args)
    bbox = results["bbox"]
    assert {"AP", "AP50", "AP75", "APs", "APm"} <= set(bbox)
    assert all(0.0 <= bbox[k] <= 100.0 for k in ("AP", "AP50", "AP75"))
    assert "AP-circle" in bbox  # per-class AP of the built-in classes


def test_missing_config_file_is_a_clear_error(tmp_path):
    from d2_distill.engine import setup_cfg

    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        setup_cfg(str(tmp_path / "nope.yaml"), [])
