"""How hard does each loss pull? Gradient norm of every loss term, per student part.

    python -m benchmarks.loss_gradients --config-file configs/quickstart/tar_faster_rcnn.yaml \\
            --student-weights output/runs/faster_rcnn_R18_FPN_student/iters400_seed0/plain_student/model_final.pth

Builds the distiller of ``--config-file`` (teacher from DISTILL.TEACHER.WEIGHTS or
``--teacher-weights``), optionally initialises the student from a checkpoint,
runs ``--batches`` training batches and, for every loss term the distiller
returns (detection and distillation), prints its value and the L2 norm of its
gradient on each top-level part of the student (backbone, proposal_generator,
roi_heads / head), averaged over the batches. A distillation term whose
gradient dwarfs the ground-truth terms' on the same part drowns them: this is
how the TAR head terms' normaliser was chosen (benchmarks/RESULTS.md). It also
prints each distillation loss's gradient ratio to the sum of the detection losses
on the student's backbone and head, what DISTILL.DIAGNOSTICS.GRAD_PERIOD logs
during training, and the share each adaptive gate keeps open on the same batches
(``distill/*_rate``: objects, RoIs).
Nothing is trained: the weights are the same after the run.
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from typing import Dict, List

from . import cli, setups as lab, stats

# the student's own losses (detectron2's names), against which the ratios are taken
DETECTION_LOSSES = ("loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc", "loss_mask")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="a distiller config (MODEL.META_ARCHITECTURE Distiller)")
    p.add_argument("--student-weights", default="",
                   help="initialise the student from this checkpoint (default: the config's own initialisation)")
    p.add_argument("--teacher-weights", default="", help="override DISTILL.TEACHER.WEIGHTS")
    p.add_argument("--batches", type=int, default=4, help="training batches to average over (default 4)")
    p.add_argument("--output", default="", help="also write the table as JSON here")
    cli.add_opts_argument(p, "extra config opts")
    args = p.parse_args(argv)
    cli.check_opts(p, args)
    cli.check_positive(p, "--batches", args.batches)
    for flag, path in (("--config-file", args.config_file), ("--student-weights", args.student_weights),
                       ("--teacher-weights", args.teacher_weights)):
        cli.check_file(p, flag, path)
    return args


def measure(args) -> Dict:
    import torch
    from detectron2.data import build_detection_train_loader
    from detectron2.utils.events import EventStorage

    from d2_distill.engine import DistillTrainer, setup_cfg
    from d2_distill.modeling import attach_teacher
    from d2_distill.modeling.diagnostics import gradient_norm, gradient_ratios, student_parts

    opts = list(args.opts) + (["DISTILL.TEACHER.WEIGHTS", args.teacher_weights] if args.teacher_weights else [])
    cfg = setup_cfg(args.config_file, opts)
    if cfg.MODEL.META_ARCHITECTURE != "Distiller":
        raise SystemExit(f"{args.config_file}: MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE!r}, "
                         "this tool needs a distiller config (Distiller)")
    from detectron2.utils.env import seed_all_rng

    seed_all_rng(cfg.SEED if cfg.SEED >= 0 else 0)  # same init and the same batches on every run
    model = attach_teacher(DistillTrainer.build_model(cfg), cfg)  # what DistillTrainer trains
    if args.student_weights:
        from detectron2.checkpoint import DetectionCheckpointer

        DetectionCheckpointer(model.student).load(args.student_weights)
    model.train()
    parts = {name: [p for p in child.parameters() if p.requires_grad]
             for name, child in model.student.named_children()}
    parts = {k: v for k, v in parts.items() if v}
    sums: Dict[str, Dict[str, float]] = defaultdict(lambda: defaultdict(float))
    ratio_sums: Dict[str, float] = defaultdict(float)
    data = iter(build_detection_train_loader(cfg))
    # the storage stays at iteration 0, so the distiller logs its gates on every batch
    with EventStorage(0) as storage:
        for _ in range(args.batches):
            losses = model(next(data))
            for name, loss in losses.items():
                sums[name]["value"] += float(loss.detach())
                for part, params in parts.items():
                    sums[name][part] += float(gradient_norm(loss, params))
            # what DISTILL.DIAGNOSTICS.GRAD_PERIOD logs: each distillation loss against the
            # sum of the detection losses, on the student's backbone and head
            detection = sum(v for k, v in losses.items() if k in DETECTION_LOSSES)
            distill = {k: v for k, v in losses.items() if k not in DETECTION_LOSSES}
            for key, value in gradient_ratios(detection, distill, student_parts(model.student)).items():
                ratio_sums[key] += value
        rates = {k[len("distill/"):]: sum(v for v, _ in h.values()) / len(h.values())
                 for k, h in sorted(storage.histories().items()) if k.startswith("distill/") and k.endswith("_rate")}
    table = {name: {k: v / args.batches for k, v in row.items()} for name, row in sorted(sums.items())}
    return {"config_file": args.config_file, "student_weights": args.student_weights or None,
            "batches": args.batches, "parts": list(parts), "losses": table,
            "grad_ratios": {k: v / args.batches for k, v in sorted(ratio_sums.items())}, "gate_rates": rates}


def markdown(result: Dict) -> str:
    parts: List[str] = result["parts"]
    lines = ["| loss | value | " + " | ".join(f"‖∇‖ {p}" for p in parts) + " |",
             "|---" * (len(parts) + 2) + "|"]
    for name, row in result["losses"].items():
        lines.append(f"| {name} | {row['value']:.3f} | " + " | ".join(f"{row[p]:.3f}" for p in parts) + " |")
    if result.get("grad_ratios"):
        lines += ["", "| distillation loss / part | ‖∇ loss‖ / ‖∇ detection losses‖ |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in result["grad_ratios"].items()]
    if result.get("gate_rates"):
        lines += ["", "| gate | share of its candidates taught |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in result["gate_rates"].items()]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    result = measure(args)
    print(markdown(result))
    if args.output:
        stats.write_json(args.output, result)
    return result


if __name__ == "__main__":
    main()
