#!/usr/bin/env python
"""How hard does each loss pull? Gradient norm of every loss term, per student part.

    python benchmarks/loss_gradients.py --config-file configs/quickstart/tar_faster_rcnn.yaml \\
        --student-weights output/runs/tar/iters400_seed0/plain_student/model_final.pth

Builds the distiller of ``--config-file`` (teacher from DISTILL.TEACHER.WEIGHTS or
``--teacher-weights``), optionally initialises the student from a checkpoint,
runs ``--batches`` training batches and, for every loss term the distiller
returns (detection and distillation), prints its value and the L2 norm of its
gradient on each top-level part of the student (backbone, proposal_generator,
roi_heads / head), averaged over the batches. A distillation term whose
gradient dwarfs the ground-truth terms' on the same part drowns them: this is
how the TAR head terms' normaliser was chosen (README, TAR).
Nothing is trained: the weights are the same after the run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="a distiller config (MODEL.META_ARCHITECTURE Distiller)")
    p.add_argument("--student-weights", default="",
                   help="initialise the student from this checkpoint (default: the config's own initialisation)")
    p.add_argument("--teacher-weights", default="", help="override DISTILL.TEACHER.WEIGHTS")
    p.add_argument("--batches", type=int, default=4, help="training batches to average over (default 4)")
    p.add_argument("--output", default="", help="also write the table as JSON here")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="extra config opts (KEY VALUE ...)")
    args = p.parse_args(argv)
    if args.opts and args.opts[0] == "--":
        args.opts = args.opts[1:]
    if len(args.opts) % 2:
        p.error(f"opts must be KEY VALUE pairs, got {args.opts}")
    if args.batches <= 0:
        p.error(f"--batches must be positive, got {args.batches}")
    for flag, path in (("--config-file", args.config_file), ("--student-weights", args.student_weights),
                       ("--teacher-weights", args.teacher_weights)):
        if path and not os.path.isfile(path):
            p.error(f"{flag}: no such file {path!r}")
    return args


def measure(args) -> Dict:
    import torch
    from detectron2.data import build_detection_train_loader
    from detectron2.utils.events import EventStorage

    from d2_distill.engine import setup_cfg
    from d2_distill.engine.trainer import DistillTrainer

    opts = list(args.opts) + (["DISTILL.TEACHER.WEIGHTS", args.teacher_weights] if args.teacher_weights else [])
    cfg = setup_cfg(args.config_file, opts)
    if cfg.MODEL.META_ARCHITECTURE != "Distiller":
        raise SystemExit(f"{args.config_file}: MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE!r}, "
                         "this tool needs a distiller config (Distiller)")
    from detectron2.utils.env import seed_all_rng

    seed_all_rng(cfg.SEED if cfg.SEED >= 0 else 0)  # same init and the same batches on every run
    model = DistillTrainer.build_model(cfg)
    if args.student_weights:
        from detectron2.checkpoint import DetectionCheckpointer

        DetectionCheckpointer(model.student).load(args.student_weights)
    model.train()
    parts = {name: [p for p in child.parameters() if p.requires_grad]
             for name, child in model.student.named_children()}
    parts = {k: v for k, v in parts.items() if v}
    sums: Dict[str, Dict[str, float]] = defaultdict(lambda: defaultdict(float))
    data = iter(build_detection_train_loader(cfg))
    with EventStorage(0):
        for _ in range(args.batches):
            losses = model(next(data))
            for name, loss in losses.items():
                sums[name]["value"] += float(loss.detach())
                for part, params in parts.items():
                    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                    sums[name][part] += sum(float(g.float().square().sum()) for g in grads if g is not None) ** 0.5
    table = {name: {k: v / args.batches for k, v in row.items()} for name, row in sorted(sums.items())}
    return {"config_file": args.config_file, "student_weights": args.student_weights or None,
            "batches": args.batches, "parts": list(parts), "losses": table}


def markdown(result: Dict) -> str:
    parts: List[str] = result["parts"]
    lines = ["| loss | value | " + " | ".join(f"‖∇‖ {p}" for p in parts) + " |",
             "|---" * (len(parts) + 2) + "|"]
    for name, row in result["losses"].items():
        lines.append(f"| {name} | {row['value']:.3f} | " + " | ".join(f"{row[p]:.3f}" for p in parts) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    result = measure(args)
    print(markdown(result))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
