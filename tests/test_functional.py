"""Tests of d2_distill.losses (the pure loss functions).

Expected values are worked out by hand in the comments next to them (not by
re-running the formula under test).
"""
import math

import pytest
import torch

from d2_distill import losses as Fn
from d2_distill.losses import (
    SCHEDULE_KINDS,
    feature_imitation_loss,
    gaussian_mask,
    giou_loss_rowwise,
    harmony_score,
    quality_focal_distill_loss,
    rowwise_iou,
    schedule_factor,
    tar_cls_gate,
    tar_cls_loss,
    tar_reg_gate,
    tar_reg_loss,
    tfd_balance,
    tfd_mask,
)

LN2 = math.log(2.0)
LN3 = math.log(3.0)


def t(x, dtype=torch.float32, **kw):
    return torch.tensor(x, dtype=dtype, **kw)


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64),
                          torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=tol)


# --------------------------------------------------------------------------- #
# schedule_factor
# --------------------------------------------------------------------------- #
class TestSchedule:
    def test_kinds_exposed(self):
        assert SCHEDULE_KINDS == ("linear", "step", "cosine", "constant")

    @pytest.mark.parametrize(
        "it, expected",
        [
            (0, 1.0),  # 1 - 0/100
            (25, 0.75),  # 1 - 25/100
            (50, 0.5),
            (100, 0.0),  # 1 - 100/100
            (150, 0.0),  # 1 - 1.5 = -0.5 -> clamped to 0
        ],
    )
    def test_linear(self, it, expected):
        assert schedule_factor("linear", it, 100) == pytest.approx(expected, abs=1e-12)

    @pytest.mark.parametrize(
        "it, expected",
        [
            (0, 1.0),  # 0.5 (1 + cos 0) = 1
            (25, 0.5 * (1 + math.sqrt(2) / 2)),  # cos(pi/4) = sqrt(2)/2 -> 0.853553...
            (50, 0.5),  # cos(pi/2) = 0
            (100, 0.0),  # cos(pi) = -1
            (150, 0.0),  # past the end: 0, not 0.5 (1 + cos(1.5 pi)) = 0.5
            (200, 0.0),  # past the end: 0, not 0.5 (1 + cos(2 pi)) = 1
        ],
    )
    def test_cosine(self, it, expected):
        assert schedule_factor("cosine", it, 100) == pytest.approx(expected, abs=1e-12)

    @pytest.mark.parametrize(
        "it, expected",
        [
            # T = 100, 30 iters/epoch -> E = ceil(100/30) = 4 epochs, steps of 1/4
            (0, 1.0),  # epoch 0
            (29, 1.0),  # floor(29/30) = 0
            (30, 0.75),  # floor(30/30) = 1 -> 1 - 1/4
            (65, 0.5),  # floor(65/30) = 2 -> 1 - 2/4
            (95, 0.25),  # floor(95/30) = 3 -> 1 - 3/4
            (100, 0.25),  # still epoch 3 at t = T
            (120, 0.0),  # past the end
            (1000, 0.0),
        ],
    )
    def test_step(self, it, expected):
        assert schedule_factor("step", it, 100, iters_per_epoch=30) == pytest.approx(expected, abs=1e-12)

    def test_step_exact_epochs(self):
        # T = 100, 25 iters/epoch -> E = 4; t = 99 -> floor(99/25) = 3 -> 0.25; t = 100 -> 4 -> 0
        assert schedule_factor("step", 99, 100, iters_per_epoch=25) == pytest.approx(0.25)
        assert schedule_factor("step", 100, 100, iters_per_epoch=25) == pytest.approx(0.0)

    @pytest.mark.parametrize("it", [0, 50, 100, 5000])
    def test_constant(self, it):
        assert schedule_factor("constant", it, 100) == 1.0

    def test_warmup(self):
        # linear, T = 100, warm-up 10: t = 0 -> 1 * 0/10 = 0
        assert schedule_factor("linear", 0, 100, warmup_iters=10) == pytest.approx(0.0)
        # t = 5 -> (1 - 5/100) * 5/10 = 0.95 * 0.5 = 0.475
        assert schedule_factor("linear", 5, 100, warmup_iters=10) == pytest.approx(0.475)
        # t = 10 -> (1 - 0.1) * min(1, 1) = 0.9
        assert schedule_factor("linear", 10, 100, warmup_iters=10) == pytest.approx(0.9)
        # t = 40 -> warm-up over: 0.6
        assert schedule_factor("linear", 40, 100, warmup_iters=10) == pytest.approx(0.6)
        # constant, warm-up 4: t = 1 -> 1/4
        assert schedule_factor("constant", 1, 100, warmup_iters=4) == pytest.approx(0.25)
        # cosine, T = 100, warm-up 100: t = 50 -> 0.5 * 0.5 = 0.25
        assert schedule_factor("cosine", 50, 100, warmup_iters=100) == pytest.approx(0.25)
        # step, T = 100, 30/epoch, warm-up 60: t = 30 -> 0.75 * 30/60 = 0.375
        assert schedule_factor("step", 30, 100, warmup_iters=60, iters_per_epoch=30) == pytest.approx(0.375)

    @pytest.mark.parametrize("kind", SCHEDULE_KINDS)
    def test_range(self, kind):
        for it in range(-5, 260, 7):
            r = schedule_factor(kind, it, 200, warmup_iters=13, iters_per_epoch=30)
            assert isinstance(r, float)
            assert 0.0 <= r <= 1.0

    def test_unknown_kind(self):
        with pytest.raises(ValueError) as ei:
            schedule_factor("exponential", 0, 100)
        msg = str(ei.value)
        assert "exponential" in msg
        for k in SCHEDULE_KINDS:
            assert k in msg

    @pytest.mark.parametrize("ipe", [0, -3])
    def test_step_without_iters_per_epoch(self, ipe):
        with pytest.raises(ValueError, match=f"iters_per_epoch={ipe}"):
            schedule_factor("step", 0, 100, iters_per_epoch=ipe)

    @pytest.mark.parametrize("max_iter", [0, -1])
    def test_bad_max_iter(self, max_iter):
        with pytest.raises(ValueError, match="max_iter"):
            schedule_factor("linear", 0, max_iter)


# --------------------------------------------------------------------------- #
# gaussian_mask
# --------------------------------------------------------------------------- #
class TestGaussianMask:
    def test_no_boxes(self):
        m = gaussian_mask(torch.zeros(0, 4), 3, 5, 8)
        assert m.shape == (3, 5)
        assert m.dtype == torch.float32
        assert torch.equal(m, torch.zeros(3, 5))

    def test_box_in_middle(self):
        # box (2,2,10,10): centre (6,6), w = h = 8, rho = 0.25 -> sigma = 2, 2 sigma^2 = 8.
        # stride 4, 4x4 map: cell centres at 2, 6, 10, 14.
        m = gaussian_mask(t([[2.0, 2.0, 10.0, 10.0]]), 4, 4, 4)
        assert m.shape == (4, 4) and m.dtype == torch.float32
        # cell (1,1) centre (6,6) = box centre -> exp(0) = 1 (the peak)
        assert close(m[1, 1], 1.0)
        assert m.argmax().item() == 1 * 4 + 1
        # cell (1,2) centre (10,6): dx = 4 -> 16/8 = 2 -> e^-2
        assert close(m[1, 2], math.exp(-2))
        # cell (0,0) centre (2,2): dx = dy = -4 -> 2 + 2 -> e^-4
        assert close(m[0, 0], math.exp(-4))
        # cell (2,3) centre (14,10): dx = 8 -> 64/8 = 8, dy = 4 -> 2 -> e^-10
        assert close(m[2, 3], math.exp(-10), tol=1e-9)

    def test_anisotropic_and_ratio(self):
        # box (0,0,16,8): centre (8,4), w = 16 -> sx = 4 (2 sx^2 = 32), h = 8 -> sy = 2 (2 sy^2 = 8)
        m = gaussian_mask(t([[0.0, 0.0, 16.0, 8.0]]), 4, 4, 4)
        # cell (0,1) centre (6,2): dx = -2 -> 4/32 = 0.125, dy = -2 -> 4/8 = 0.5 -> e^-0.625
        assert close(m[0, 1], math.exp(-0.625))
        # rho = 0.5, box (2,2,10,10): sigma = 4 (2 sigma^2 = 32); cell (1,2) centre (10,6): 16/32 -> e^-0.5
        m = gaussian_mask(t([[2.0, 2.0, 10.0, 10.0]]), 4, 4, 4, sigma_ratio=0.5)
        assert close(m[1, 2], math.exp(-0.5))

    def test_box_at_edge(self):
        # 16x16 image, stride 4 -> 4x4 map; box (10,10,16,16) touches the right/bottom border.
        # centre (13,13), w = h = 6 -> sigma = 1.5, 2 sigma^2 = 4.5
        m = gaussian_mask(t([[10.0, 10.0, 16.0, 16.0]]), 4, 4, 4)
        assert torch.isfinite(m).all()
        assert (m >= 0).all() and (m <= 1).all()
        # nearest cell centre to (13,13) is (14,14) = cell (3,3)
        assert m.argmax().item() == 3 * 4 + 3
        # cell (3,3): dx = dy = 1 -> 1/4.5 each -> exp(-2/4.5) = exp(-0.4444)
        assert close(m[3, 3], math.exp(-2 / 4.5))
        # cell (2,2) centre (10,10): dx = dy = -3 -> 9/4.5 = 2 each -> e^-4
        assert close(m[2, 2], math.exp(-4))

    def test_box_outside_image(self):
        # box partly beyond the image: still finite, peak at the cell nearest its centre (15,15)
        m = gaussian_mask(t([[12.0, 12.0, 18.0, 18.0]]), 4, 4, 4)
        assert torch.isfinite(m).all()
        assert m.argmax().item() == 15

    def test_two_boxes_max_not_sum(self):
        # box A (2,2,10,10) centre (6,6); box B (6,2,14,10) centre (10,6); sigma = 2 for both
        m = gaussian_mask(t([[2.0, 2.0, 10.0, 10.0], [6.0, 2.0, 14.0, 10.0]]), 4, 4, 4)
        # cell (1,1) centre (6,6): A -> 1, B dx = -4 -> e^-2; max = 1 (a sum would be 1 + e^-2)
        assert close(m[1, 1], 1.0)
        # cell (1,2) centre (10,6): A -> e^-2, B -> 1
        assert close(m[1, 2], 1.0)
        # cell (1,0) centre (2,6): A dx = -4 -> e^-2; B dx = -8 -> 64/8 -> e^-8; max e^-2
        assert close(m[1, 0], math.exp(-2))
        assert m.max() <= 1.0

    def test_sigma_floor_tiny_box(self):
        # box (5,5,6,6): w = 1, rho w = 0.25 -> sigma floored at 1 (2 sigma^2 = 2); stride 1
        m = gaussian_mask(t([[5.0, 5.0, 6.0, 6.0]]), 12, 12, 1)
        # cell (5,5) centre (5.5,5.5) = box centre -> 1
        assert close(m[5, 5], 1.0)
        # cell (5,6) centre (6.5,5.5): dx = 1 -> 1/2 -> e^-0.5 (sigma 0.25 would give e^-8)
        assert close(m[5, 6], math.exp(-0.5))

    def test_far_tail_is_zero_not_subnormal(self):
        # box (5,5,6,6), stride 1: sigma 1 (2 sigma^2 = 2); cell (5, 5+d) has e^(-d^2/2)
        boxes = t([[5.0, 5.0, 6.0, 6.0]])
        for m in (gaussian_mask(boxes, 12, 40, 1), gaussian_mask(boxes, 12, 40, 1, weights=t([1.0]))):
            assert close(m[5, 5 + 7], math.exp(-24.5), tol=1e-15)  # 2.3e-11: above the floor, kept
            assert torch.equal(m[5, 5 + 8:], torch.zeros(40 - 13))  # e^-32 = 1.3e-14 and beyond: 0
            tiny = torch.finfo(torch.float32).tiny
            assert not ((m > 0) & (m < tiny)).any()  # no subnormal anywhere
            assert m[m > 0].min() >= 1e-12
        # the floor applies after the weight: 0.01 * e^-24.5 = 2.3e-13 -> 0
        assert float(gaussian_mask(boxes, 12, 40, 1, weights=t([0.01]))[5, 5 + 7]) == 0.0

    def test_float32_output_for_float64_boxes(self):
        m = gaussian_mask(t([[2.0, 2.0, 10.0, 10.0]], dtype=torch.float64), 4, 4, 4)
        assert m.dtype == torch.float32


# --------------------------------------------------------------------------- #
# feature_imitation_loss
# --------------------------------------------------------------------------- #
def _fi_level0():
    # (N=1, C=2, H=1, W=2). Channel 0 = [1, 3], channel 1 = [2, 3]:
    # cell 0 = (1, 2), cell 1 = (3, 3). Teacher: cell 0 = (0, 0), cell 1 = (1, 1).
    s = t([[[[1.0, 3.0]], [[2.0, 3.0]]]], requires_grad=True)
    te = t([[[[0.0, 1.0]], [[0.0, 1.0]]]])
    return s, te


class TestFeatureImitation:
    def test_hand_computed(self):
        s, te = _fi_level0()
        m = t([[[1.0, 0.5]]])
        # cell 0: |(1,2)|^2 = 5 -> /C = 2.5; cell 1: |(2,2)|^2 = 8 -> /C = 4
        # num = 1 * 2.5 + 0.5 * 4 = 4.5; sum M = 1.5 -> L = 4.5 / 1.5 = 3
        loss = feature_imitation_loss([s], [te], [m])
        assert loss.dim() == 0 and loss.dtype == torch.float32
        assert close(loss, 3.0)
        loss.backward()
        # dL/dS = 2 M (S - T) / C / 1.5: cell 0 -> (1,2)/1.5, cell 1 -> 0.5 (2,2)/1.5
        expected = t([[[[1 / 1.5, 1 / 1.5]], [[2 / 1.5, 1 / 1.5]]]])
        assert close(s.grad, expected)

    def test_normaliser_floor(self):
        s, te = _fi_level0()
        # mask (0.5, 0.25): num = 0.5 * 2.5 + 0.25 * 4 = 2.25; sum M = 0.75 -> max(0.75, 1) = 1
        loss = feature_imitation_loss([s], [te], [t([[[0.5, 0.25]]])])
        assert close(loss, 2.25)

    def test_zero_mask(self):
        s, te = _fi_level0()
        loss = feature_imitation_loss([s], [te], [torch.zeros(1, 1, 2)])
        assert torch.isfinite(loss)
        assert loss.item() == 0.0
        assert loss.requires_grad
        loss.backward()
        assert s.grad is not None
        assert torch.equal(s.grad, torch.zeros_like(s))

    def test_empty_batch(self):
        s = torch.zeros(0, 2, 3, 3, requires_grad=True)
        loss = feature_imitation_loss([s], [torch.zeros(0, 2, 3, 3)], [torch.zeros(0, 3, 3)])
        assert loss.item() == 0.0
        loss.backward()
        assert s.grad is not None

    def test_teacher_gets_no_grad(self):
        s, te = _fi_level0()
        te.requires_grad_(True)
        loss = feature_imitation_loss([s], [te], [t([[[1.0, 0.5]]])])
        loss.backward()
        assert te.grad is None
        assert s.grad is not None

    def test_two_levels(self):
        s0, t0 = _fi_level0()
        m0 = t([[[1.0, 0.5]]])  # num 4.5, sum M 1.5 (see test_hand_computed)
        s1 = t([[[[2.0]]]], requires_grad=True)  # (1,1,1,1)
        t1 = t([[[[0.0]]]])
        m1 = t([[[2.0]]])  # |2|^2 / C(=1) = 4 -> num 8, sum M 2
        loss = feature_imitation_loss([s0, s1], [t0, t1], [m0, m1])
        # (4.5 + 8) / (1.5 + 2) = 12.5 / 3.5
        assert close(loss, 12.5 / 3.5)
        loss.backward()
        # dL/ds1 = 2 * 2 * (2 - 0) / 1 / 3.5 = 8 / 3.5
        assert close(s1.grad, t([[[[8 / 3.5]]]]))

    def test_shape_mismatch(self):
        s0, t0 = _fi_level0()
        m0 = t([[[1.0, 0.5]]])
        s1 = torch.zeros(1, 4, 2, 2)
        t1 = torch.zeros(1, 4, 2, 3)
        with pytest.raises(ValueError) as ei:
            feature_imitation_loss([s0, s1], [t0, t1], [m0, torch.zeros(1, 2, 2)])
        msg = str(ei.value)
        assert "level 1" in msg
        assert "(1, 4, 2, 2)" in msg and "(1, 4, 2, 3)" in msg

    def test_level_count_mismatch(self):
        s0, t0 = _fi_level0()
        with pytest.raises(ValueError):
            feature_imitation_loss([s0], [t0, t0], [t([[[1.0, 0.5]]])])


# --------------------------------------------------------------------------- #
# TAR gates
# --------------------------------------------------------------------------- #
class TestTarGates:
    def test_cls_gate(self):
        s = t(
            [
                [0.0, 0.0, 0.0],  # p_S(0) = 1/3
                [2.0, 0.0, 0.0],  # p_S(0) = e^2 / (e^2 + 2) ~ 0.787
                [1.0, 2.0, 3.0],  # same as teacher
                [0.0, 0.0, 0.0],  # p_S(0) = 1/3
                [3.0, 0.0, 0.0],  # p_S(1) = 1 / (e^3 + 2) ~ 0.045
            ],
            requires_grad=True,
        )
        te = t(
            [
                [2.0, 0.0, 0.0],  # p_T(0) ~ 0.787 > 1/3 -> teacher more right -> True
                [0.0, 0.0, 0.0],  # p_T(0) = 1/3 < 0.787 -> less right -> False
                [1.0, 2.0, 3.0],  # tie -> False
                [5.0, 5.0, 5.0],  # uniform = 1/3 (shift invariant), tie -> False
                [0.0, 1.0, 0.0],  # p_T(1) = e / (e + 2) ~ 0.576 > 0.045 -> True
            ]
        )
        gt = torch.tensor([0, 0, 2, 0, 1])
        g = tar_cls_gate(s, te, gt)
        assert g.dtype == torch.bool
        assert not g.requires_grad
        assert g.tolist() == [True, False, False, False, True]

    def test_cls_gate_empty(self):
        g = tar_cls_gate(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
        assert g.shape == (0,) and g.dtype == torch.bool

    def test_rowwise_iou(self):
        b1 = t([[0, 0, 10, 10], [0, 0, 2, 2], [1, 1, 1, 1], [0, 0, 10, 10]])
        b2 = t([[5, 5, 15, 15], [3, 3, 4, 4], [1, 1, 1, 1], [0, 0, 5, 10]])
        iou = rowwise_iou(b1, b2)
        # row 0: inter 5x5 = 25, union 100 + 100 - 25 = 175 -> 1/7
        # row 1: disjoint -> 0
        # row 2: two identical points, union 0 -> 0 (not NaN)
        # row 3: inter 50, union 100 -> 0.5
        assert iou.shape == (4,)  # row-aligned, not (4, 4)
        assert close(iou, t([1 / 7, 0.0, 0.0, 0.5]))
        assert rowwise_iou(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0,)

    def test_reg_gate(self):
        gt = t([[0, 0, 10, 10]] * 4 + [[5, 5, 5, 5]])
        teacher = t(
            [
                [0, 0, 10, 10],  # IoU 1
                [0, 0, 5, 10],  # IoU 50/100 = 0.5
                [3, 3, 3, 3],  # degenerate point: IoU 0
                [0, 0, 5, 10],  # 0.5
                [5, 5, 5, 5],  # degenerate vs degenerate gt: union 0 -> IoU 0
            ]
        )
        ref = t(
            [
                [0, 0, 5, 10],  # 0.5 -> 1 > 0.5: True
                [0, 0, 10, 10],  # 1 -> 0.5 > 1: False
                [0, 0, 5, 10],  # 0.5 -> 0 > 0.5: False
                [2, 2, 2, 8],  # zero width: IoU 0 -> 0.5 > 0: True
                [5, 5, 5, 5],  # 0 -> 0 > 0: False (no NaN)
            ]
        )
        g = tar_reg_gate(teacher, ref, gt)
        assert g.dtype == torch.bool and g.shape == (5,)
        assert g.tolist() == [True, False, False, True, False]


# --------------------------------------------------------------------------- #
# TAR losses
# --------------------------------------------------------------------------- #
# 2-class case: z_S = (0, 0) -> q = (1/2, 1/2); z_T = (ln 3, 0) -> p = (3/4, 1/4).
# KL(p||q) = 3/4 ln(3/4 / 1/2) + 1/4 ln(1/4 / 1/2) = 0.75 ln 1.5 - 0.25 ln 2
KL_2CLS = 0.75 * math.log(1.5) - 0.25 * LN2  # 0.130812...


class TestTarClsLoss:
    def test_identical_logits(self):
        z = t([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]])
        loss = tar_cls_loss(z.clone().requires_grad_(True), z, torch.ones(2, dtype=torch.bool))
        assert abs(loss.item()) < 1e-7

    def test_hand_computed(self):
        s = t([[0.0, 0.0]], requires_grad=True)
        te = t([[LN3, 0.0]])
        loss = tar_cls_loss(s, te, torch.ones(1, dtype=torch.bool))
        assert loss.dim() == 0
        assert close(loss, KL_2CLS)  # 0.130812
        loss.backward()
        # d KL(p || softmax(z)) / dz = q - p = (0.5 - 0.75, 0.5 - 0.25)
        assert close(s.grad, t([[-0.25, 0.25]]))

    def test_temperature(self):
        # tau = 2, z_T = (2 ln 3, 0) -> z_T / tau = (ln 3, 0): same p, same KL -> loss = 4 KL
        s = t([[0.0, 0.0]], requires_grad=True)
        loss = tar_cls_loss(s, t([[2 * LN3, 0.0]]), torch.ones(1, dtype=torch.bool), temperature=2.0)
        assert close(loss, 4 * KL_2CLS)
        loss.backward()
        # dL/dz_S = tau^2 (q - p) / tau = 2 (q - p)
        assert close(s.grad, t([[-0.5, 0.5]]))

    def test_gate_and_normaliser(self):
        s = t([[0.0, 0.0], [0.0, 0.0]], requires_grad=True)
        te = t([[LN3, 0.0], [0.0, LN3]])  # both rows have KL = KL_2CLS (symmetry)
        # gate (1, 0): row 1 removed, normaliser stays R = 2 -> KL / 2
        loss = tar_cls_loss(s, te, torch.tensor([True, False]))
        assert close(loss, KL_2CLS / 2)
        loss.backward()
        assert close(s.grad, t([[-0.125, 0.125], [0.0, 0.0]]))
        # gate (1, 1): 2 KL / 2
        assert close(tar_cls_loss(s, te, torch.tensor([True, True])), KL_2CLS)
        # float gate works too
        assert close(tar_cls_loss(s, te, t([1.0, 0.0])), KL_2CLS / 2)
        # all gates closed: 0
        assert tar_cls_loss(s, te, torch.tensor([False, False])).item() == 0.0

    def test_teacher_detached(self):
        s = t([[0.0, 0.0]], requires_grad=True)
        te = t([[LN3, 0.0]], requires_grad=True)
        tar_cls_loss(s, te, torch.ones(1, dtype=torch.bool)).backward()
        assert te.grad is None

    def test_empty(self):
        s = torch.zeros(0, 3, requires_grad=True)
        loss = tar_cls_loss(s, torch.zeros(0, 3), torch.zeros(0, dtype=torch.bool))
        assert torch.isfinite(loss) and loss.item() == 0.0
        assert loss.requires_grad
        loss.backward()
        assert s.grad is not None and s.grad.shape == (0, 3)

    def test_bad_temperature(self):
        with pytest.raises(ValueError):
            tar_cls_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), temperature=0.0)


class TestTarRegLoss:
    def _inputs(self):
        # row 0 differences (0.5, -2, 0, 1); row 1 differences (2, 0, 0, 0)
        s = t([[0.5, -2.0, 0.0, 1.0], [3.0, 0.0, 0.0, 0.0]], requires_grad=True)
        te = t([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
        return s, te

    def test_beta1(self):
        s, te = self._inputs()
        # beta = 1, row 0: 0.5 * 0.25 = 0.125; |-2| - 0.5 = 1.5; 0; |1| - 0.5 = 0.5 -> 2.125
        # row 1: 2 - 0.5 = 1.5 (gated off). R = 2 -> 2.125 / 2 = 1.0625
        loss = tar_reg_loss(s, te, torch.tensor([True, False]), beta=1.0)
        assert close(loss, 1.0625)
        loss.backward()
        # grads / R: (0.5 / 1, sign(-2), 0, sign(1)) / 2 = (0.25, -0.5, 0, 0.5); row 1 gated -> 0
        assert close(s.grad, t([[0.25, -0.5, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0]]))
        # both rows: (2.125 + 1.5) / 2 = 1.8125
        assert close(tar_reg_loss(s, te, torch.tensor([True, True]), beta=1.0), 1.8125)

    def test_beta0_is_l1(self):
        s, te = self._inputs()
        # L1 row 0: 0.5 + 2 + 0 + 1 = 3.5 -> / 2 = 1.75
        assert close(tar_reg_loss(s, te, torch.tensor([True, False]), beta=0.0), 1.75)
        # both rows: (3.5 + 2) / 2 = 2.75
        assert close(tar_reg_loss(s, te, torch.tensor([True, True]), beta=0.0), 2.75)

    def test_beta_half(self):
        s, te = self._inputs()
        # beta = 0.5, row 0: |0.5| not < 0.5 -> 0.5 - 0.25 = 0.25; 2 - 0.25 = 1.75; 0; 1 - 0.25 = 0.75
        # sum 2.75, R = 2 -> 1.375
        assert close(tar_reg_loss(s, te, torch.tensor([True, False]), beta=0.5), 1.375)

    def test_teacher_detached_and_empty(self):
        s, te = self._inputs()
        te.requires_grad_(True)
        tar_reg_loss(s, te, torch.ones(2, dtype=torch.bool), beta=1.0).backward()
        assert te.grad is None
        e = torch.zeros(0, 4, requires_grad=True)
        loss = tar_reg_loss(e, torch.zeros(0, 4), torch.zeros(0, dtype=torch.bool), beta=1.0)
        assert torch.isfinite(loss) and loss.item() == 0.0
        loss.backward()
        assert e.grad is not None


# --------------------------------------------------------------------------- #
# harmony score / quality focal
# --------------------------------------------------------------------------- #
class TestHarmony:
    def test_values(self):
        s = t([1.0, 0.8, 0.0, 0.0])
        u = t([1.0, 0.6, 0.7, 0.0])
        hs = harmony_score(s, u, quality_exp=1.0)
        # (1,1): 1 * 1 = 1; (0.8,0.6): (1 - 0.2) sqrt(0.48) = 0.8 * 0.69282 = 0.554256;
        # (0,0.7): s u = 0 -> 0; (0,0): 1 * 0^(1/2) = 0
        assert close(hs, t([1.0, 0.8 * math.sqrt(0.48), 0.0, 0.0]))
        # gamma = 2: (0.8,0.6) -> 0.8 * 0.48 = 0.384; (0,0.7) -> 0
        assert close(harmony_score(s, u, 2.0), t([1.0, 0.384, 0.0, 0.0]))
        # gamma = 0: 1 - |s - u| -> 1, 0.8, 0.3, 1
        assert close(harmony_score(s, u, 0.0), t([1.0, 0.8, 0.3, 1.0]))

    def test_clamp_range_detached(self):
        # (1.5, 1): s clamped to 1 -> 1; (-0.2, 0.5) gamma 0: s -> 0 -> 1 - 0.5 = 0.5
        assert close(harmony_score(t([1.5, -0.2]), t([1.0, 0.5]), 0.0), t([1.0, 0.5]))
        g = torch.Generator().manual_seed(0)
        s = (torch.rand(50, 7, generator=g) * 3 - 1).requires_grad_(True)
        u = torch.rand(50, 7, generator=g) * 3 - 1
        for gamma in (0.0, 0.5, 1.0, 2.0):
            hs = harmony_score(s, u, gamma)
            assert hs.shape == (50, 7)
            assert not hs.requires_grad
            assert (hs >= 0).all() and (hs <= 1).all()


class TestQualityFocal:
    def test_equal_logits(self):
        z = t([[-3.0, 0.0, 2.5], [10.0, -10.0, 0.3]])
        loss = quality_focal_distill_loss(z.clone().requires_grad_(True), z)
        assert loss.shape == (2, 3)
        assert torch.equal(loss, torch.zeros(2, 3))

    def test_hand_computed(self):
        s = t([0.0, LN3], requires_grad=True)
        te = t([LN3, 0.0])
        loss = quality_focal_distill_loss(s, te)
        # elem 0: p = 1/2, t = 3/4: BCE = -(0.75 ln 0.5 + 0.25 ln 0.5) = ln 2; |t-p|^2 = 1/16
        #   -> ln 2 / 16 = 0.0433217
        # elem 1: p = 3/4, t = 1/2: BCE = -(0.5 ln 0.75 + 0.5 ln 0.25) = 0.836988; * 1/16 = 0.0523118
        e1 = -(0.5 * math.log(0.75) + 0.5 * math.log(0.25)) / 16
        assert close(loss, t([LN2 / 16, e1]))
        loss.sum().backward()
        assert s.grad is not None and (s.grad != 0).all()

    def test_temperature(self):
        # tau = 2: z_S = 0, z_T = 2 ln 3 -> z_T / tau = ln 3: same as elem 0 above
        loss = quality_focal_distill_loss(t([0.0]), t([2 * LN3]), temperature=2.0)
        assert close(loss, t([LN2 / 16]))

    def test_teacher_detached_and_empty(self):
        s = t([0.0, 1.0], requires_grad=True)
        te = t([1.0, 0.0], requires_grad=True)
        quality_focal_distill_loss(s, te).sum().backward()
        assert te.grad is None
        e = torch.zeros(0, 80, requires_grad=True)
        out = quality_focal_distill_loss(e, torch.zeros(0, 80))
        assert out.shape == (0, 80)
        out.sum().backward()
        assert e.grad is not None


# --------------------------------------------------------------------------- #
# GIoU
# --------------------------------------------------------------------------- #
class TestGiou:
    def test_values(self):
        b1 = t([[0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 2, 2]])
        b2 = t([[0, 0, 2, 2], [2, 0, 3, 1], [1, 1, 3, 3]])
        loss = giou_loss_rowwise(b1, b2)
        # row 0 identical -> 0
        # row 1: inter 0, union 2, enclosing (0,0,3,1) area 3 -> GIoU = 0 - 1/3 -> loss 4/3
        # row 2: inter 1, union 7, enclosing (0,0,3,3) area 9 -> GIoU = 1/7 - 2/9 = -5/63 -> 68/63
        assert loss.shape == (3,)
        assert close(loss, t([0.0, 4 / 3, 68 / 63]))

    def test_degenerate(self):
        b1 = t([[1, 1, 1, 1], [0, 0, 0, 5], [2, 2, 2, 2]], requires_grad=True)
        b2 = t([[1, 1, 1, 1], [0, 0, 2, 2], [4, 4, 4, 4]], requires_grad=True)
        loss = giou_loss_rowwise(b1, b2)
        assert torch.isfinite(loss).all()
        # row 0: identical points -> IoU 0, enclosing area 0 -> GIoU 0 -> 1
        # row 1: zero-width box: inter 0, union 4, enclosing (0,0,2,5) = 10 -> 0 - 6/10 -> 1.6
        # row 2: two points: union 0, enclosing (2,2,4,4) = 4 -> 0 - 4/4 = -1 -> 2
        assert close(loss, t([1.0, 1.6, 2.0]))
        loss.sum().backward()
        assert torch.isfinite(b1.grad).all() and torch.isfinite(b2.grad).all()

    def test_gradient(self):
        b1 = t([[0, 0, 2, 2]], requires_grad=True)
        loss = giou_loss_rowwise(b1, t([[1, 1, 3, 3]]))
        loss.sum().backward()
        assert b1.grad is not None and b1.grad.abs().sum() > 0
        e = torch.zeros(0, 4, requires_grad=True)
        out = giou_loss_rowwise(e, torch.zeros(0, 4))
        assert out.shape == (0,)
        out.sum().backward()


# --------------------------------------------------------------------------- #
# TFD mask / balance
# --------------------------------------------------------------------------- #
def _tfd_inputs():
    # cls_prob[0, a, k, 0, w] (N=1, A=2, K=2, H=1, W=2):
    #   a0 k0 [0.1, 0.6]; a0 k1 [0.3, 0.2]; a1 k0 [0.2, 0.1]; a1 k1 [0.9, 0.4]
    #   max over (a, k): w0 -> 0.9, w1 -> 0.6
    cls_prob = t([[[[[0.1, 0.6]], [[0.3, 0.2]]], [[[0.2, 0.1]], [[0.9, 0.4]]]]])
    # max_iou[0, a, 0, w]: a0 [0.5, 0.2]; a1 [0.3, 0.8] -> max over a: [0.5, 0.8]
    max_iou = t([[[[0.5, 0.2]], [[0.3, 0.8]]]])
    return cls_prob, max_iou


class TestTfd:
    def test_mask(self):
        cp, mi = _tfd_inputs()
        assert cp.shape == (1, 2, 2, 1, 2) and mi.shape == (1, 2, 1, 2)
        assert close(tfd_mask(cp, mi, 1.0), t([[[0.9, 0.6]]]))
        assert close(tfd_mask(cp, mi, 0.0), t([[[0.5, 0.8]]]))
        # 0.5 * 0.9 + 0.5 * 0.5 = 0.7; 0.5 * 0.6 + 0.5 * 0.8 = 0.7
        assert close(tfd_mask(cp, mi, 0.5), t([[[0.7, 0.7]]]))
        # tensor w = 0.25: 0.225 + 0.375 = 0.6; 0.15 + 0.6 = 0.75
        m = tfd_mask(cp, mi, torch.tensor(0.25))
        assert m.shape == (1, 1, 2)
        assert close(m, t([[[0.6, 0.75]]]))

    def test_mask_detached(self):
        cp, mi = _tfd_inputs()
        cp.requires_grad_(True)
        w = torch.tensor(0.5, requires_grad=True)
        assert not tfd_mask(cp, mi, w).requires_grad

    @pytest.mark.parametrize("w", [1.5, -0.1, float("nan")])
    def test_mask_bad_weight(self, w):
        cp, mi = _tfd_inputs()
        with pytest.raises(ValueError):
            tfd_mask(cp, mi, w)

    def test_mask_shape_mismatch(self):
        cp, _ = _tfd_inputs()
        with pytest.raises(ValueError):
            tfd_mask(cp, torch.zeros(1, 3, 1, 2), 0.5)

    def test_balance(self):
        # 3 / (3 + 1) = 0.75: more weight to the larger (cls) loss
        assert close(tfd_balance(t(3.0), t(1.0)), 0.75)
        assert close(tfd_balance(t(1.0), t(3.0)), 0.25)
        assert close(tfd_balance(t(2.0), t(0.0)), 1.0)
        w0 = tfd_balance(t(0.0), t(0.0))
        assert w0.dim() == 0 and torch.isfinite(w0) and w0.item() == 0.5
        c = t(3.0, requires_grad=True)
        w = tfd_balance(c * 1, t(1.0))
        assert not w.requires_grad


# --------------------------------------------------------------------------- #
# dtype robustness
# --------------------------------------------------------------------------- #
def _loss_cases(dtype):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    boxes_a = t([[0, 0, 4, 4], [1, 1, 1, 1], [2, 0, 5, 3]], dtype=dtype)
    boxes_b = t([[1, 1, 5, 5], [1, 1, 1, 1], [0, 0, 1, 1]], dtype=dtype)
    gate = torch.tensor([True, False, True])
    return {
        "feature_imitation_loss": (
            lambda s: feature_imitation_loss([s], [r(2, 3, 4, 5)], [torch.rand(2, 4, 5, generator=g).to(dtype)]),
            r(2, 3, 4, 5),
        ),
        "tar_cls_loss": (lambda s: tar_cls_loss(s, r(3, 4), gate, 2.0), r(3, 4)),
        "tar_reg_loss": (lambda s: tar_reg_loss(s, r(3, 4), gate, 0.5), r(3, 4)),
        "quality_focal_distill_loss": (lambda s: quality_focal_distill_loss(s, r(3, 5)).sum(), r(3, 5)),
        "giou_loss_rowwise": (lambda s: giou_loss_rowwise(s, boxes_b).sum(), boxes_a),
    }


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "name",
    ["feature_imitation_loss", "tar_cls_loss", "tar_reg_loss", "quality_focal_distill_loss", "giou_loss_rowwise"],
)
def test_loss_dtypes(dtype, name):
    fn, x = _loss_cases(dtype)[name]
    x = x.clone().requires_grad_(True)
    loss = fn(x)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    loss.backward()
    assert x.grad is not None and x.grad.dtype == dtype
    assert torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_functions_dtypes(dtype):
    b1 = t([[0, 0, 4, 4], [1, 1, 1, 1]], dtype=dtype)
    b2 = t([[1, 1, 5, 5], [1, 1, 1, 1]], dtype=dtype)
    assert torch.isfinite(rowwise_iou(b1, b2)).all()
    assert tar_reg_gate(b1, b2, b1).dtype == torch.bool
    z = torch.randn(2, 3).to(dtype)
    assert tar_cls_gate(z, z * 2, torch.tensor([0, 2])).dtype == torch.bool
    assert torch.isfinite(harmony_score(t([0.3, 0.9], dtype=dtype), t([0.5, 0.1], dtype=dtype))).all()
    m = gaussian_mask(b1, 3, 3, 2)
    assert m.dtype == torch.float32 and torch.isfinite(m).all()
    cp, mi = _tfd_inputs()
    assert torch.isfinite(tfd_mask(cp.to(dtype), mi.to(dtype), torch.tensor(0.3, dtype=dtype))).all()
    assert torch.isfinite(tfd_balance(t(0.0, dtype=dtype), t(0.0, dtype=dtype)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast():
    dev = "cuda"
    s = torch.randn(2, 8, 6, 6, device=dev, requires_grad=True)
    conv = torch.nn.Conv2d(8, 8, 1).to(dev)
    with torch.autocast("cuda", dtype=torch.float16):
        fs = conv(s)
        loss = feature_imitation_loss([fs], [torch.randn_like(fs)], [torch.rand(2, 6, 6, device=dev)])
        logits = conv(s).flatten(2).mean(-1)  # (2, 8)
        loss = loss + tar_cls_loss(logits, torch.randn(2, 8, device=dev), torch.ones(2, dtype=torch.bool, device=dev))
        loss = loss + quality_focal_distill_loss(logits, torch.randn(2, 8, device=dev)).sum()
        m = gaussian_mask(torch.tensor([[0.0, 0.0, 8.0, 8.0]], device=dev), 6, 6, 2)
        assert m.device.type == "cuda"
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all()


# --------------------------------------------------------------------------- #
# device agnosticism: the meta device has no data, so any CPU tensor mixed in,
# or any .item() / host sync, raises.
# --------------------------------------------------------------------------- #
def test_meta_device_no_cpu_tensors():
    meta = torch.device("meta")
    boxes = torch.empty(3, 4, device=meta)
    assert gaussian_mask(boxes, 4, 5, 8).device == meta
    assert gaussian_mask(torch.empty(0, 4, device=meta), 4, 5, 8).shape == (4, 5)
    f = torch.empty(2, 3, 4, 5, device=meta)
    assert feature_imitation_loss([f], [f], [torch.empty(2, 4, 5, device=meta)]).device == meta
    z = torch.empty(6, 4, device=meta)
    gate = torch.empty(6, dtype=torch.bool, device=meta)
    assert tar_cls_gate(z, z, torch.empty(6, dtype=torch.long, device=meta)).device == meta
    assert tar_reg_gate(z, z, z).device == meta
    assert tar_cls_loss(z, z, gate, 2.0).device == meta
    assert tar_reg_loss(z, z, gate, 1.0).device == meta
    assert tar_reg_loss(z, z, gate, 0.0).device == meta
    assert harmony_score(z, z).device == meta
    assert quality_focal_distill_loss(z, z).device == meta
    assert giou_loss_rowwise(z, z).device == meta
    assert rowwise_iou(z, z).device == meta
    cp = torch.empty(1, 2, 3, 4, 5, device=meta)
    mi = torch.empty(1, 2, 4, 5, device=meta)
    assert tfd_mask(cp, mi, 0.5).device == meta
    assert tfd_mask(cp, mi, torch.empty((), device=meta)).device == meta
    assert tfd_balance(torch.empty((), device=meta), torch.empty((), device=meta)).device == meta


def test_public_names():
    for name in Fn.__all__:
        assert callable(getattr(Fn, name)) or name == "SCHEDULE_KINDS"
        if name != "SCHEDULE_KINDS":
            assert getattr(Fn, name).__doc__
