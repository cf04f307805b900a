#!/usr/bin/env python
"""Train or evaluate a detector, plain or distilled, the detectron2 way.

    python train_net.py --config-file configs/quickstart/tar_faster_rcnn.yaml
    python train_net.py --config-file ... --num-gpus 8
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file ... --resume

Evaluation (--eval-only) builds the student alone: the teacher's weights are
neither needed nor read, unless DISTILL.EVAL.TEACHER asks to evaluate it too.
"""
import logging

# Known third-party deprecation warnings (detectron2 on torch 2.14) are silenced
# for this program; d2_distill's own warnings stay visible.
from d2_distill.quiet import silence_third_party_warnings

silence_third_party_warnings()

from detectron2.engine import default_argument_parser, launch  # noqa: E402

from d2_distill.engine import DistillCheckpointer, DistillTrainer, setup_cfg  # noqa: E402
from d2_distill.modeling import build_teacher  # noqa: E402
from d2_distill.student import is_distiller_cfg  # noqa: E402


def main(args):
    cfg = setup_cfg(args.config_file, args.opts, args)
    if args.eval_only:
        model = DistillTrainer.build_model(cfg)  # a Distiller: its student only
        DistillCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = DistillTrainer.test(cfg, model)
        if cfg.DISTILL.EVAL.TEACHER and is_distiller_cfg(cfg):
            logging.getLogger("d2_distill").info("Evaluating the teacher")
            results = {"student": results, "teacher": DistillTrainer.test(cfg, build_teacher(cfg).model)}
        return results

    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
