"""SOLVER.AMP.ENABLED on CPU: bfloat16 autocast in the forward pass, float32 weights."""
import pytest
import torch
from detectron2.engine import AMPTrainer, SimpleTrainer

from d2_distill.engine import DistillTrainer
from d2_distill.engine.amp import CPUAutocastTrainer
from helpers import cfg_for


def _record_dtypes(module: torch.nn.Module, out: list):
    """Forward hook on every Conv2d of ``module``: appends (training mode, output dtype)."""
    return [m.register_forward_hook(lambda m_, _i, y: out.append((m_.training, y.dtype)))
            for m in module.modules() if isinstance(m, torch.nn.Conv2d)]


def test_the_step_is_chosen_by_amp_and_device(tmp_path):
    off = cfg_for("retinanet_R18_FPN_student.yaml", out_dir=tmp_path)
    on = cfg_for("retinanet_R18_FPN_student.yaml", "SOLVER.AMP.ENABLED", "True", out_dir=tmp_path)
    assert DistillTrainer._loop_class(off) is SimpleTrainer
    assert DistillTrainer._loop_class(on) is CPUAutocastTrainer
    cuda = on.clone()
    cuda.defrost()
    cuda.MODEL.DEVICE = "cuda"
    assert DistillTrainer._loop_class(cuda) is AMPTrainer  # detectron2's own float16 step on GPU


@pytest.mark.slow
def test_distillation_step_runs_teacher_and_student_in_bfloat16(tmp_path, retina_teacher_weights):
    cfg = cfg_for("tbd_retinanet.yaml", "SOLVER.AMP.ENABLED", "True", out_dir=tmp_path,
                  teacher=retina_teacher_weights, iters=2)
    trainer = DistillTrainer(cfg)
    assert isinstance(trainer._trainer, CPUAutocastTrainer)
    distiller = trainer.model
    student_dtypes, teacher_dtypes = [], []
    handles = _record_dtypes(distiller.student, student_dtypes) + _record_dtypes(distiller.teacher, teacher_dtypes)
    trainer.resume_or_load(resume=False)
    trainer.train()
    for h in handles:
        h.remove()
    # the training steps ran both models' convolutions in bfloat16 (the teacher is in
    # eval mode), the final evaluation (DefaultTrainer.test) the student's in float32
    assert {d for training, d in student_dtypes if training} == {torch.bfloat16}
    assert {d for training, d in student_dtypes if not training} == {torch.float32}
    assert teacher_dtypes and {d for _, d in teacher_dtypes} == {torch.bfloat16}
    # weights, gradients and the saved checkpoint stay float32
    params = [p for p in distiller.student.parameters()]
    assert all(p.dtype == torch.float32 for p in params)
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in params)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    state = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert all(v.dtype != torch.bfloat16 for v in state.values())
    losses = trainer.storage.latest()
    assert all(torch.isfinite(torch.tensor(v)) for k, (v, _) in losses.items() if k.startswith("loss_"))
