"""PKD: pkd_loss against hand-computed values and its invariances, and the
method through the user's path (quickstart config -> DistillTrainer) for a
two-stage and a one-stage pair."""
import math

import pytest
import torch
from detectron2.utils.events import EventStorage

from d2_distill.losses import pkd_loss
from d2_distill.methods.pkd import PKDMethod

from helpers import cfg_for, fake_batch, train
from trainable import build_trainable


def t(values, shape):
    return torch.tensor(values, dtype=torch.float64).view(*shape)


# ---- pkd_loss ------------------------------------------------------------------------
def test_hand_computed_single_channel():
    # s = [1, 2, 3]: mean 2, unbiased std 1 -> s_hat = [-1, 0, 1]; t = [3, 2, 1] -> t_hat = [1, 0, -1]
    # mean((s_hat - t_hat)^2) / 2 = (4 + 0 + 4) / 3 / 2 = 4/3
    loss = pkd_loss([t([1, 2, 3], (1, 1, 1, 3))], [t([3, 2, 1], (1, 1, 1, 3))], eps=0.0)
    assert loss.item() == pytest.approx(4 / 3, abs=1e-12)


def test_hand_computed_two_levels_two_channels_two_images():
    # level 0, C=2, N=2, H=1, W=... each channel has 3 values over (N, H, W) jointly:
    #   channel 0: s = [1, 2 | 3], t = 5 s + 7           -> identical after standardising: 0
    #   channel 1: s = [0, 0 | 3]: mean 1, centred [-1, -1, 2], var (1+1+4)/2 = 3 -> [-1, -1, 2]/sqrt3
    #              t = [0, 3 | 0]                      -> [-1, 2, -1]/sqrt3
    #              diff = [0, -3, 3]/sqrt3, squares [0, 3, 3]: sum 6
    #   mean over the 6 entries: 6/6 = 1, halved: 0.5
    # level 1: the single-channel case above: 4/3.      total 0.5 + 4/3 = 11/6
    # images are the N axis: image 0 holds the first two values (W=2 needs equal widths,
    # so use N=3, W=1: values per channel are (n0, n1, n2)).
    s0 = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 3.0]], dtype=torch.float64).view(3, 2, 1, 1)
    t0 = torch.tensor([[12.0, 0.0], [17.0, 3.0], [22.0, 0.0]], dtype=torch.float64).view(3, 2, 1, 1)
    s1, t1 = t([1, 2, 3], (1, 1, 1, 3)), t([3, 2, 1], (1, 1, 1, 3))
    loss = pkd_loss([s0, s1], [t0, t1], eps=0.0)
    assert loss.item() == pytest.approx(11 / 6, abs=1e-12)


def test_equals_one_minus_pearson_up_to_the_estimator():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 1, 3, 4, generator=g, dtype=torch.float64)
    tt = torch.randn(2, 1, 3, 4, generator=g, dtype=torch.float64)
    m = s.numel()
    r = torch.corrcoef(torch.stack([s.flatten(), tt.flatten()]))[0, 1]
    assert pkd_loss([s], [tt], eps=0.0).item() == pytest.approx(((1 - r) * (m - 1) / m).item(), rel=1e-10)


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_invariant_to_per_channel_scale_and_shift(which):
    g = torch.Generator().manual_seed(1)
    s = [torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64), torch.randn(2, 3, 2, 3, generator=g, dtype=torch.float64)]
    tt = [torch.randn_like(x) for x in s]
    before = pkd_loss(s, tt, eps=0.0)
    scale = torch.tensor([0.01, 3.0, 250.0], dtype=torch.float64).view(1, 3, 1, 1)
    shift = torch.tensor([-4.0, 0.5, 1e3], dtype=torch.float64).view(1, 3, 1, 1)
    moved = [x * scale + shift for x in (s if which == "student" else tt)]
    after = pkd_loss(moved, tt, eps=0.0) if which == "student" else pkd_loss(s, moved, eps=0.0)
    assert before.item() > 0.5  # unrelated random maps: far from 0
    assert after.item() == pytest.approx(before.item(), rel=1e-9)


def test_zero_for_per_channel_affine_images():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 4, 3, 3, generator=g)
    scale = torch.tensor([0.5, 2.0, 10.0, 1e-2]).view(1, 4, 1, 1)
    shift = torch.tensor([1.0, -3.0, 0.0, 100.0]).view(1, 4, 1, 1)
    assert pkd_loss([s], [s * scale + shift]).item() == pytest.approx(0.0, abs=1e-5)
    # a negative scale is anti-correlation, the worst case: 2 (x (M-1)/M)
    m = 2 * 3 * 3
    assert pkd_loss([s], [-s], eps=0.0).item() == pytest.approx(2 * (m - 1) / m, rel=1e-5)


def test_gradient_reaches_the_student_only():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    tt = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    pkd_loss([s], [tt]).backward()
    assert tt.grad is None
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_constant_channels_and_single_values_are_finite():
    s = torch.ones(1, 2, 1, 1, requires_grad=True)  # one value per channel: std 0, not NaN
    loss = pkd_loss([s], [torch.full((1, 2, 1, 1), 5.0)])
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(s.grad).all()
    assert pkd_loss([torch.zeros(0, 2, 3, 3)], [torch.zeros(0, 2, 3, 3)]).item() == 0.0


def test_float16_accumulates_in_float32():
    s = torch.randn(1, 2, 3, 3).half()
    assert pkd_loss([s], [s.flip(-1)]).dtype == torch.float32


@pytest.mark.parametrize(
    "student, teacher, message",
    [
        ([], [], "at least one level"),
        ([torch.zeros(1, 2, 3, 3)], [], "same number of levels"),
        ([torch.zeros(1, 2, 3, 3)], [torch.zeros(1, 2, 3, 4)], r"level 0: student shape \(1, 2, 3, 3\)"),
        ([torch.zeros(2, 3, 3)], [torch.zeros(2, 3, 3)], r"\(N, C, H, W\)"),
    ],
)
def test_bad_inputs(student, teacher, message):
    with pytest.raises(ValueError, match=message):
        pkd_loss(student, teacher)


# ---- the method, through the user's path ---------------------------------------------------
CASES = {
    "faster_rcnn": ("pkd_faster_rcnn.yaml", "frcnn_teacher_weights", ["p2", "p3", "p4", "p5", "p6"]),
    "retinanet": ("pkd_retinanet.yaml", "retina_teacher_weights", ["p3", "p4", "p5", "p6", "p7"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.slow
def test_pkd_trains_two_iterations(case, request, tmp_path):
    config, weights_fixture, levels = CASES[case]
    cfg = cfg_for(config, teacher=request.getfixturevalue(weights_fixture), out_dir=tmp_path, iters=2)
    trainer = train(cfg)
    model = trainer.model
    assert isinstance(model.method, PKDMethod) and model.method.features.levels == levels
    hist = [v for v, _ in trainer.storage.history("loss_pkd").values()]
    assert len(hist) == 2 and all(math.isfinite(v) and v > 0 for v in hist)
    assert [v for v, _ in trainer.storage.history("distill/schedule_factor").values()] == [1.0, 1.0]  # constant
    assert (tmp_path / "model_final.pth").is_file()
    saved = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert {f"method.features.adapters.{k}.weight" for k in levels} <= set(saved)


def test_pkd_runs_only_the_teacher_backbone(frcnn_teacher_weights):
    model = build_trainable(cfg_for("pkd_faster_rcnn.yaml", "DISTILL.PKD.LEVELS", "['p3', 'p5']",
                                    teacher=frcnn_teacher_weights))
    calls = {"backbone": 0, "rpn": 0, "roi_heads": 0}
    t = model.teacher.model
    for name, m in (("backbone", t.backbone), ("rpn", t.proposal_generator), ("roi_heads", t.roi_heads)):
        m.register_forward_pre_hook(lambda mod, args, name=name: calls.__setitem__(name, calls[name] + 1))
    model.train()
    with EventStorage(0):
        losses = model(fake_batch(2, boxes_per_image=0))  # no GT needed: PKD has no mask
    assert calls == {"backbone": 1, "rpn": 0, "roi_heads": 0}
    assert torch.isfinite(losses["loss_pkd"]) and losses["loss_pkd"] > 0
    losses["loss_pkd"].backward()
    assert set(model.method.features.adapters) == {"p3", "p5"}
    assert all(p.grad is not None for p in model.method.parameters())


def test_pkd_zero_weight_skips_the_teacher(frcnn_teacher_weights):
    model = build_trainable(cfg_for("pkd_faster_rcnn.yaml", "DISTILL.PKD.WEIGHT", "0.0", teacher=frcnn_teacher_weights))
    calls = []
    model.teacher.model.backbone.register_forward_pre_hook(lambda m, a: calls.append(1))
    model.train()
    with EventStorage(0):
        losses = model(fake_batch(1))
    assert not calls and "loss_pkd" not in losses and not list(model.method.parameters())


def test_pkd_unknown_level_is_a_clear_error(frcnn_teacher_weights):
    with pytest.raises(ValueError, match=r"DISTILL.PKD.LEVELS: level 'p9' is not an output of both backbones"):
        build_trainable(cfg_for("pkd_faster_rcnn.yaml", "DISTILL.PKD.LEVELS", "['p9']", teacher=frcnn_teacher_weights))
