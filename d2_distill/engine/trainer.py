"""DistillTrainer: detectron2's DefaultTrainer, plus what distillation needs.

* the built-in shapes datasets are generated on first use;
* checkpoints go through :class:`DistillCheckpointer` (student-only checkpoints in
  MODEL.WEIGHTS initialise the student; the teacher is never saved);
* the evaluator is COCOEvaluator, plus the harmony evaluator when
  DISTILL.EVAL.HARMONY is on.

It trains plain detectron2 models too (any META_ARCHITECTURE), so one entry point
serves the teacher, the plain student and the distilled student.
"""
from __future__ import annotations

import logging
import os
import weakref
from typing import List, Optional

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators

from ..config import add_distill_config
from ..data import ensure_datasets
from .checkpoint import DistillCheckpointer

__all__ = ["DistillTrainer", "setup_cfg"]

logger = logging.getLogger(__name__)


def setup_cfg(config_file: str, opts: Optional[List[str]] = None, args=None) -> CfgNode:
    """Build the frozen config the detectron2 way: defaults + DISTILL node + file + opts.

    With ``args`` (from ``default_argument_parser``), also runs detectron2's
    ``default_setup`` (logging, output dir, seed, config dump).
    """
    cfg = get_cfg()
    add_distill_config(cfg)
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"--config-file {config_file!r} does not exist")
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts or []))
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger("d2_distill").warning(
            "MODEL.DEVICE=%s but CUDA is not available: using cpu", cfg.MODEL.DEVICE
        )
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    if args is not None:
        default_setup(cfg, args)
    return cfg


class DistillTrainer(DefaultTrainer):
    def __init__(self, cfg: CfgNode):
        ensure_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
        super().__init__(cfg)

    def build_hooks(self):
        # DefaultTrainer made a DetectionCheckpointer; ours understands both
        # distiller checkpoints and plain detectron2 ones (for the student).
        self.checkpointer = DistillCheckpointer(
            self.checkpointer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        return super().build_hooks()

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None):
        ensure_datasets([dataset_name])
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        evaluators = [COCOEvaluator(dataset_name, output_dir=output_folder)]
        if cfg.DISTILL.EVAL.HARMONY:
            from ..evaluation import HarmonyEvaluator

            evaluators.append(HarmonyEvaluator(dataset_name, tolerance=cfg.DISTILL.EVAL.HARMONY_TOL))
        return DatasetEvaluators(evaluators) if len(evaluators) > 1 else evaluators[0]

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        ensure_datasets([dataset_name])
        return super().build_test_loader(cfg, dataset_name)
