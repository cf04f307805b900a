"""Shared test settings: small inputs and the mini datasets, so a training
iteration of the quickstart models takes well under a second on 2 cores."""
from __future__ import annotations

import os
from typing import List, Sequence

import torch
from detectron2.engine import HookBase
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from d2_distill.engine import DistillTrainer, setup_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QS = os.path.join(ROOT, "configs", "quickstart")

SMALL = [
    "MODEL.DEVICE", "cpu",
    "DATASETS.TRAIN", "('shapes_mini_train',)",
    "DATASETS.TEST", "('shapes_mini_val',)",
    "INPUT.MIN_SIZE_TRAIN", "(128,)",
    "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "128",
    "INPUT.MAX_SIZE_TEST", "128",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.WARMUP_ITERS", "0",
    "DATALOADER.NUM_WORKERS", "0",
    "TEST.DETECTIONS_PER_IMAGE", "20",
]


def qs(name: str) -> str:
    return os.path.join(QS, name)


def cfg_for(config: str, *opts: Sequence[str], out_dir: str = "", teacher: str = "", iters: int = 2):
    all_opts: List[str] = list(SMALL) + ["SOLVER.MAX_ITER", str(iters)]
    if teacher:
        all_opts += ["DISTILL.TEACHER.WEIGHTS", teacher]
    if out_dir:
        all_opts += ["OUTPUT_DIR", str(out_dir)]
    all_opts += [str(o) for o in opts]
    return setup_cfg(qs(config), all_opts)


def train(cfg, resume: bool = False) -> DistillTrainer:
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


def build(cfg):
    return build_model(cfg)


def fake_batch(n: int = 2, size: int = 128, boxes_per_image: int = 2, seed: int = 0):
    """Images with random pixels and fixed boxes (``boxes_per_image=0`` for empty images)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        inst = Instances((size, size))
        b = torch.tensor([[8.0, 10.0, 60.0, 70.0], [50.0, 40.0, 120.0, 100.0], [5.0, 80.0, 30.0, 120.0]])
        inst.gt_boxes = Boxes(b[:boxes_per_image])
        inst.gt_classes = torch.tensor([1, 4, 2][:boxes_per_image], dtype=torch.int64)
        img = torch.randint(0, 256, (3, size, size), generator=g).float()
        out.append({"image": img, "instances": inst, "height": size, "width": size})
    return out


class Interrupt(HookBase):
    """Stops training with an exception after iteration ``at`` (after its checkpoint),
    as a killed job would."""

    def __init__(self, at: int):
        self.at = at

    def after_step(self):
        if self.trainer.iter == self.at:
            raise KeyboardInterrupt(f"interrupted after iteration {self.at}")


def flat_cfg(cfg, prefix: str = "") -> dict:
    """{"A.B.C": value} of a CfgNode."""
    out = {}
    for k, v in cfg.items():
        out.update(flat_cfg(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def changed_keys(base, other) -> set:
    """The full keys whose values differ between two merged configs of one schema."""
    flat_base = flat_cfg(base)
    return {k for k, v in flat_cfg(other).items() if flat_base[k] != v}
