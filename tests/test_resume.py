"""Exact resume: a run interrupted after a checkpoint and resumed ends exactly like
the run that was never interrupted (d2_distill/engine/resume.py)."""
import os

import pytest
import torch
from detectron2.utils.env import seed_all_rng

from d2_distill.engine import DistillTrainer
from d2_distill.engine.resume import SkipSampler

from helpers import Interrupt, cfg_for

MAX_ITER = 4
OPTS = ("SOLVER.CHECKPOINT_PERIOD", "2", "DATASETS.TEST", "()")


def _trainer(cfg, seed: int) -> DistillTrainer:
    seed_all_rng(seed)  # what default_setup does with cfg.SEED
    return DistillTrainer(cfg)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same(a, b, where="checkpoint"):
    """Recursive exact equality of two loaded checkpoints (tensors: torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: max |diff| {(a.double() - b.double()).abs().max().item():.3g}"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _logged(trainer, keys, iters):
    out = {}
    for k in keys:
        hist = dict((int(it), v) for v, it in trainer.storage.history(k).values())
        out[k] = [hist.get(it) for it in iters]
    return out


@pytest.mark.slow
def test_resume_is_exact(frcnn_teacher_weights, tmp_path):
    a_dir, b_dir = tmp_path / "uninterrupted", tmp_path / "interrupted"
    cfg_a = cfg_for("tar_faster_rcnn_paper.yaml", *OPTS, teacher=frcnn_teacher_weights, out_dir=a_dir, iters=MAX_ITER)
    cfg_b = cfg_for("tar_faster_rcnn_paper.yaml", *OPTS, teacher=frcnn_teacher_weights, out_dir=b_dir, iters=MAX_ITER)
    assert cfg_a.DISTILL.METHOD == "TAR" and cfg_a.DATALOADER.NUM_WORKERS == 0

    whole = _trainer(cfg_a, cfg_a.SEED)
    whole.resume_or_load(resume=False)
    whole.train()

    first = _trainer(cfg_b, cfg_b.SEED)
    first.register_hooks([Interrupt(at=1)])
    first.resume_or_load(resume=False)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert (b_dir / "model_0000001.pth").is_file() and not (b_dir / "model_final.pth").exists()

    # A different process seed: everything random after the resume must come from the checkpoint.
    resumed = _trainer(cfg_b, 12345)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    resumed.train()

    # every checkpoint is readable with weights_only=True (RNG states included)
    for d in (a_dir, b_dir):
        for name in sorted(os.listdir(d)):
            if name.endswith(".pth"):
                ckpt = _load(d / name)
                assert "model" in ckpt and "RNGStateHook" in ckpt["trainer"]["hooks"], name

    _assert_same(_load(a_dir / "model_0000001.pth"), _load(b_dir / "model_0000001.pth"), "model_0000001")
    final_a, final_b = _load(a_dir / "model_final.pth"), _load(b_dir / "model_final.pth")
    assert final_a["iteration"] == final_b["iteration"] == MAX_ITER - 1
    assert set(final_a["model"]) and all(k.startswith(("student.", "method.")) for k in final_a["model"])
    # weights, optimizer momentum, LR scheduler and RNG states: all bit-identical
    _assert_same(final_a, final_b, "model_final")

    keys = sorted(k for k in whole.storage.histories() if k.startswith("loss_")) + ["distill/schedule_factor"]
    assert {"loss_tar_feat", "loss_tar_cls", "loss_tar_reg", "loss_cls", "loss_rpn_cls"} <= set(keys)
    logged_a, logged_b = _logged(whole, keys, [2, 3]), _logged(resumed, keys, [2, 3])
    assert all(None not in v for v in logged_a.values())
    assert logged_a == logged_b  # exact equality of every logged loss at iterations 2 and 3
    assert logged_b["distill/schedule_factor"] == pytest.approx([1 - 2 / MAX_ITER, 1 - 3 / MAX_ITER])


def test_resumed_loader_continues_the_stream(tmp_path):
    """build_train_loader(cfg, skip=k*batch) yields what the full loader yields after k batches."""
    cfg = cfg_for("tar_faster_rcnn_paper.yaml", "DISTILL.TEACHER.WEIGHTS", "unused.pth", out_dir=tmp_path)
    batch = cfg.SOLVER.IMS_PER_BATCH

    def names(loader, n):
        it = iter(loader)
        return [[os.path.basename(x["file_name"]) for x in next(it)] for _ in range(n)]

    from d2_distill.data import ensure_datasets

    ensure_datasets(cfg.DATASETS.TRAIN)
    full = names(DistillTrainer.build_train_loader(cfg), 20)
    skipped = names(DistillTrainer.build_train_loader(cfg, skip=3 * batch), 17)
    assert skipped == full[3:]
    assert len({n for b in full for n in b}) > batch  # it is a shuffled stream, not one repeated batch
    assert list(SkipSampler(range(10), 4)) == [4, 5, 6, 7, 8, 9]


@pytest.mark.slow
def test_resume_from_a_truncated_checkpoint_names_it_and_the_last_intact_one(frcnn_teacher_weights, tmp_path):
    """A job killed while saving leaves a truncated file that last_checkpoint names:
    --resume fails with an error naming it and the newest intact checkpoint, and
    deletes nothing."""
    import time

    cfg = cfg_for("tar_faster_rcnn_paper.yaml", *OPTS, teacher=frcnn_teacher_weights, out_dir=tmp_path, iters=2)
    _trainer(cfg, 0).train()
    intact = tmp_path / "model_0000001.pth"
    final = tmp_path / "model_final.pth"
    assert intact.is_file() and (tmp_path / "last_checkpoint").read_text().strip() == "model_final.pth"
    time.sleep(0.01)
    final.write_bytes(final.read_bytes()[:1000])  # truncated
    with pytest.raises(RuntimeError) as e:
        _trainer(cfg, 0).resume_or_load(resume=True)
    msg = str(e.value)
    assert str(final) in msg and "truncated or corrupt" in msg and str(intact) in msg and "last_checkpoint" in msg
    assert final.is_file() and intact.is_file()
