"""Bad input fails before training with an error naming the value and what is valid."""
import pytest
import torch

from helpers import cfg_for
from trainable import build_trainable as build


@pytest.mark.parametrize(
    "opts, error, message",
    [
        (["DISTILL.METHOD", "KD"], ValueError, r"DISTILL.METHOD='KD' is not one of \['FEATURE', 'PKD', 'TAR', 'TBD'\]"),
        (["DISTILL.METHOD", "PKD", "DISTILL.PKD.WEIGHT", "-2.0"], ValueError, r"DISTILL.PKD.WEIGHT=-2.0 must be >= 0"),
        (["DISTILL.TBD.TFD_CLS_WEIGHT", "1.5", "DISTILL.METHOD", "TBD"], ValueError, r"TFD_CLS_WEIGHT=1.5 must be in \[0, 1\]"),
        (["DISTILL.SCHEDULE.KIND", "exp"], ValueError, r"DISTILL.SCHEDULE.KIND='exp' is not one of"),
        (["DISTILL.SCHEDULE.KIND", "step"], ValueError, "ITERS_PER_EPOCH > 0"),
        (["DISTILL.ADAPTER", "mlp"], ValueError, "DISTILL.ADAPTER='mlp' is not one of"),
        (["DISTILL.TAR.CLS_WEIGHT", "-1.0"], ValueError, r"DISTILL.TAR.CLS_WEIGHT=-1.0 must be >= 0"),
        (["DISTILL.METHOD", "TBD", "DISTILL.TBD.TFD_WEIGHT", "-0.5"], ValueError, r"DISTILL.TBD.TFD_WEIGHT=-0.5 must be >= 0"),
        (["DISTILL.TAR.REG_GATE", "teacher"], ValueError, r"REG_GATE='teacher' is not one of \['student', 'proposal', 'none'\]"),
        (["DISTILL.TAR.TEMPERATURE", "0.0"], ValueError, "TEMPERATURE=0.0 must be > 0"),
        (["DISTILL.STUDENT_META_ARCHITECTURE", "Distiller"], ValueError, "name the student's own"),
        (["DISTILL.TEACHER.CONFIG_FILE", "no/such/teacher.yaml"], FileNotFoundError, "no/such/teacher.yaml"),
    ],
)
def test_bad_config_values(frcnn_teacher_weights, opts, error, message):
    with pytest.raises(error, match=message):
        build(cfg_for("tar_faster_rcnn_paper.yaml", *opts, teacher=frcnn_teacher_weights))


def test_adapter_none_needs_equal_channels(frcnn_teacher_weights):
    with pytest.raises(ValueError, match=r"level 'p2' has 64 student vs 128 teacher channels"):
        build(cfg_for("tar_faster_rcnn_paper.yaml", "DISTILL.ADAPTER", "none", teacher=frcnn_teacher_weights))


def test_adapter_none_with_equal_channels_is_identity(frcnn_teacher_weights):
    model = build(cfg_for("tar_faster_rcnn_paper.yaml", "DISTILL.ADAPTER", "none", "MODEL.FPN.OUT_CHANNELS", "128",
                          "MODEL.ROI_BOX_HEAD.FC_DIM", "256", teacher=frcnn_teacher_weights))
    assert all(isinstance(a, torch.nn.Identity) for a in model.method.feature.adapters.values())


def test_corrupt_teacher_weights(tmp_path):
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(RuntimeError, match="could not be read as a checkpoint"):
        build(cfg_for("tar_faster_rcnn_paper.yaml", teacher=str(bad)))


def test_teacher_weights_of_another_architecture(retina_teacher_weights):
    with pytest.raises(RuntimeError, match="does not match the teacher"):
        build(cfg_for("tar_faster_rcnn_paper.yaml", teacher=retina_teacher_weights))
