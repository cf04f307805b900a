"""DistillTrainer: detectron2's DefaultTrainer, plus what distillation needs.

* the built-in shapes datasets are generated on first use;
* checkpoints go through :class:`DistillCheckpointer` (student-only checkpoints in
  MODEL.WEIGHTS initialise the student; the teacher is never saved);
* the evaluator is COCOEvaluator, plus the harmony evaluator when
  DISTILL.EVAL.HARMONY is on;
* ``--resume`` continues exactly (data stream and RNG states, see
  :mod:`d2_distill.engine.resume`), and several processes train on CPU too
  (:mod:`d2_distill.engine.ddp`).

It trains plain detectron2 models too (any META_ARCHITECTURE), so one entry point
serves the teacher, the plain student and the distilled student.
"""
from __future__ import annotations

import functools
import logging
import os
import weakref
from typing import List, Optional

import torch
import detectron2.utils.comm as comm
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, default_setup, hooks
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
from detectron2.utils.logger import setup_logger

from ..config import add_distill_config
from ..data import ensure_datasets
from ..modeling import attach_teacher
from ..modeling.teacher import teacher_config_beside
from .amp import CPUAutocastTrainer, warn_if_emulated
from .checkpoint import DistillCheckpointer
from .ddp import wrap_ddp
from .resume import RNGStateHook, build_train_loader, preserved_rng_state, samples_consumed

__all__ = ["DistillTrainer", "setup_cfg"]

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _warn_cpu_fallback(device: str) -> None:  # once per process, not once per config
    logging.getLogger("d2_distill").warning("MODEL.DEVICE=%s but CUDA is not available: using cpu", device)


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
        # like _BASE_: a teacher config named by a relative path is looked up beside
        # the file that names it first (opts given on the command line are not)
        cfg.DISTILL.TEACHER.CONFIG_FILE = teacher_config_beside(config_file, cfg.DISTILL.TEACHER.CONFIG_FILE)
    cfg.merge_from_list(list(opts or []))
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        _warn_cpu_fallback(cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    if args is not None:
        default_setup(cfg, args)
    return cfg


class DistillTrainer(DefaultTrainer):
    def __init__(self, cfg: CfgNode):
        ensure_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
        # DefaultTrainer.__init__, except for the DDP wrapper (wrap_ddp, which also
        # wraps CPU models) and the checkpointer (DistillCheckpointer); same objects,
        # built in the same order.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())

        model = attach_teacher(self.build_model(cfg), cfg)  # a Distiller gets its teacher and method here
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)

        model = wrap_ddp(model)
        self._trainer = self._loop_class(cfg)(model, data_loader, optimizer)

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        # understands both distiller checkpoints and plain detectron2 ones (for the student)
        self.checkpointer = DistillCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg

        self.register_hooks(self.build_hooks())

    @staticmethod
    def _loop_class(cfg: CfgNode) -> type:
        """The step: SimpleTrainer, or with SOLVER.AMP.ENABLED detectron2's AMPTrainer
        (CUDA, float16) or :class:`CPUAutocastTrainer` (CPU, bfloat16)."""
        if not cfg.SOLVER.AMP.ENABLED:
            return SimpleTrainer
        if cfg.MODEL.DEVICE.startswith("cuda"):
            return AMPTrainer
        warn_if_emulated()
        return CPUAutocastTrainer

    def build_hooks(self):
        ret = super().build_hooks()
        # Register the RNG hook just before the checkpointer (or where it would be on
        # non-main ranks, before the EvalHook): its state is what the checkpoint holds.
        at = next(
            (i for i, h in enumerate(ret) if isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook))),
            len(ret),
        )
        ret.insert(at, RNGStateHook(self.cfg.SOLVER.CHECKPOINT_PERIOD))
        return ret

    @classmethod
    def build_train_loader(cls, cfg: CfgNode, skip: int = 0):
        """detectron2's train loader, its shuffle seeded with cfg.SEED and its first
        ``skip`` samples skipped (:func:`d2_distill.engine.resume.build_train_loader`)."""
        return build_train_loader(cfg, skip=skip)

    def resume_or_load(self, resume: bool = True):
        super().resume_or_load(resume=resume)
        if self.start_iter > 0:
            skip = samples_consumed(self.cfg, self.start_iter)
            logger.info("Resuming at iteration %d: the train loader skips %d samples per rank", self.start_iter, skip)
            self._trainer.reset_data_loader(lambda: self.build_train_loader(self.cfg, skip=skip))

    def before_train(self):
        # Create the loader's iterator now (it draws a seed from torch's RNG), before
        # the hooks run: RNGStateHook.before_train restores the RNG states after it.
        _ = self._trainer._data_loader_iter
        super().before_train()

    @classmethod
    def test(cls, cfg: CfgNode, model, evaluators=None):
        # Evaluation (also the periodic one during training) leaves the RNG streams
        # as it found them, so it does not change the training that follows.
        with preserved_rng_state():
            return super().test(cfg, model, evaluators)

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
