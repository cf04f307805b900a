"""What every registered method declares (the contract that the config and the
lab's method discovery rely on), and every method and the Distiller built from keyword
arguments, without a distillation YAML file."""
import inspect

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from d2_distill.config import add_distill_config
from d2_distill.losses import DistillSchedule
from d2_distill.methods import DISTILL_METHOD_REGISTRY, DistillMethod, method_class, method_names
from d2_distill.modeling import Distiller
from d2_distill.modeling.teacher import FrozenTeacher

from helpers import cfg_for, fake_batch

METHODS = ["FEATURE", "PKD", "TAR", "TBD"]


def test_registry_holds_every_method():
    assert method_names() == METHODS
    assert all(issubclass(cls, DistillMethod) for _, cls in DISTILL_METHOD_REGISTRY)
    with pytest.raises(ValueError, match=r"DISTILL.METHOD='KD' is not one of \['FEATURE', 'PKD', 'TAR', 'TBD'\]"):
        method_class("KD")


@pytest.mark.parametrize("name", METHODS)
def test_method_declares_its_contract(name):
    cls = method_class(name)
    cfg = get_cfg()
    add_distill_config(cfg)
    node = cfg.DISTILL[name]  # added by the method's own add_config
    assert cls.loss_names and all(k.startswith("loss_") for k in cls.loss_names)
    assert cls.student_architectures and set(cls.student_architectures) <= {"GeneralizedRCNN", "RetinaNet"}
    assert cls.default_schedule in ("linear", "step", "cosine", "constant")
    assert cls.components
    for key in cls.components.values():
        assert key.startswith(f"DISTILL.{name}.") and key.split(".")[-1] in node
    # the keyword options are the config keys, lower-cased, with the same defaults
    params = inspect.signature(cls.__init__).parameters
    for key, default in node.items():
        assert key.lower() in params, key
        kw_default = params[key.lower()].default
        assert (list(kw_default) if isinstance(kw_default, tuple) else kw_default) == default, key
    for opt in list(cls.choices) + list(cls.non_negative) + list(cls.positive) + list(cls.unit_interval):
        assert opt.upper() in node, opt
    cls.validate_config(cfg)  # the defaults are valid


def _teacher(config):
    """A FrozenTeacher with random weights (no checkpoint, no DISTILL node)."""
    tcfg = cfg_for(config)
    torch.manual_seed(1)
    return FrozenTeacher(build_model(tcfg), tcfg)


def _student(config):
    torch.manual_seed(0)
    return build_model(cfg_for(config))


PAIRS = {
    "FEATURE": ("faster_rcnn_R18_FPN_student.yaml", "faster_rcnn_R34_FPN_teacher.yaml",
                dict(weight=2.0, levels=["p3", "p4"], gaussian_sigma_ratio=0.5), {"loss_feat"}),
    "TAR": ("faster_rcnn_R18_FPN_student.yaml", "faster_rcnn_R34_FPN_teacher.yaml",
            dict(feat_weight=1.0, cls_weight=0.5, reg_weight=0.0, reg_gate="proposal", temperature=2.0),
            {"loss_tar_feat", "loss_tar_cls"}),
    "TBD": ("retinanet_R18_FPN_student.yaml", "retinanet_R34_FPN_teacher.yaml",
            dict(hd_weight=1.0, tfd_weight=0.5, tfd_balance="fixed", tfd_cls_weight=0.3), {"loss_tbd_hd", "loss_tbd_tfd"}),
    "PKD": ("retinanet_R18_FPN_student.yaml", "retinanet_R34_FPN_teacher.yaml",
            dict(weight=1.0, levels=["p3", "p5"]), {"loss_pkd"}),
}


@pytest.mark.parametrize("name", METHODS)
def test_method_and_distiller_from_keyword_arguments(name):
    student_config, teacher_config, options, expected = PAIRS[name]
    student, teacher = _student(student_config), _teacher(teacher_config)
    method = method_class(name)(student=student, teacher=teacher, adapter="conv3x3", **options)
    assert "teacher" not in dict(method.named_modules())  # the teacher is not a submodule
    model = Distiller(student=student, teacher=teacher, method=method,
                      schedule=DistillSchedule("linear", max_iter=10))
    assert all(k.startswith(("student.", "method.")) for k in model.state_dict())
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in model.parameters()}

    model.train()
    with EventStorage(5):
        losses = model(fake_batch(2))
    assert {k for k in losses if k in method.loss_names} == expected
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.schedule_factor(5) == 0.5
    sum(losses.values()).backward()

    model.eval()
    batch = [{k: v for k, v in x.items() if k != "instances"} for x in fake_batch(1)]
    with torch.no_grad():
        ours, theirs = model(batch)[0]["instances"], student(batch)[0]["instances"]
    assert torch.equal(ours.scores, theirs.scores)


def test_keyword_options_are_checked():
    student, teacher = _student("faster_rcnn_R18_FPN_student.yaml"), _teacher("faster_rcnn_R34_FPN_teacher.yaml")
    TAR = method_class("TAR")
    with pytest.raises(ValueError, match=r"DISTILL.TAR.REG_GATE='teacher' is not one of \['student', 'proposal', 'none'\]"):
        TAR(student=student, teacher=teacher, reg_gate="teacher")
    with pytest.raises(ValueError, match=r"DISTILL.PKD.WEIGHT=-1.0 must be >= 0"):
        method_class("PKD")(student=student, teacher=teacher, weight=-1.0)
    with pytest.raises(ValueError, match="teacher and method come together"):
        Distiller(student=student, teacher=teacher)


def test_student_only_distiller_from_keyword_arguments():
    student = _student("retinanet_R18_FPN_student.yaml")
    model = Distiller(student=student)
    assert model.teacher is None and model.method is None
    model.train()
    with EventStorage(0), pytest.raises(RuntimeError, match="has no teacher"):
        model(fake_batch(1))


def test_pointwise_adapter_is_a_1x1_convolution():
    """The conv1x1 adapter (a batched matrix product) computes what nn.Conv2d(kernel 1)
    computes with the same parameters, values and gradients, and saves the same keys."""
    from d2_distill.methods.base import PointwiseConv, build_adapter

    torch.manual_seed(0)
    adapter = build_adapter("conv1x1", 6, 10)
    assert isinstance(adapter, PointwiseConv)
    conv = torch.nn.Conv2d(6, 10, 1)
    conv.load_state_dict(adapter.state_dict())
    nn_bias = torch.randn(10)
    with torch.no_grad():
        adapter.bias.copy_(nn_bias)
        conv.bias.copy_(nn_bias)
    x = torch.randn(3, 6, 5, 7, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    ya, yc = adapter(x), conv(x2)
    assert torch.allclose(ya, yc, atol=1e-5)
    g = torch.randn_like(yc)
    ya.backward(g)
    yc.backward(g)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    assert torch.allclose(adapter.weight.grad, conv.weight.grad, atol=1e-4)
    assert torch.allclose(adapter.bias.grad, conv.bias.grad, atol=1e-4)
