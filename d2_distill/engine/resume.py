"""Exact resume: the pieces DistillTrainer uses so that a resumed run continues
exactly like the run that was never stopped.

A run stopped after iteration k and resumed (``resume_or_load(resume=True)`` then
``train()``, i.e. ``train_net.py --resume``) continues exactly like the run that was
never stopped: same data, same random draws, same weights and logged losses
(checked by ``tests/test_resume.py``). Stock DefaultTrainer breaks that in two ways;
DistillTrainer fixes both with what this module provides:

1. *The data stream.* detectron2's TrainingSampler is an infinite shuffled stream,
   and a resumed DefaultTrainer starts it again from its first sample. When it
   resumes at ``start_iter > 0`` DistillTrainer rebuilds its train loader
   (:func:`build_train_loader` with ``skip``) so that every rank skips the
   ``start_iter * IMS_PER_BATCH / world_size`` samples it already consumed
   (:class:`SkipSampler`, wrapping whichever sampler detectron2 builds from
   DATALOADER.SAMPLER_TRAIN; the dataset dicts are loaded again for it). For the
   skipped stream to be *the same* stream, its shuffle seed must not depend on the
   process: with ``SEED >= 0`` the TrainingSampler is seeded with cfg.SEED. Stock
   detectron2 draws that seed from the numpy RNG, which ``default_setup`` seeds
   with cfg.SEED: equally deterministic, but a rebuilt loader would draw a new one;
   so for a given SEED the image order differs from stock DefaultTrainer's.
2. *The random number generators.* RPN/ROI sampling draws from torch's global RNG,
   augmentations from numpy's (and python's). :class:`RNGStateHook` puts the
   torch (CPU and CUDA), numpy and python RNG states of every rank into each
   checkpoint (as tensors / ints / tuples, so ``torch.load(weights_only=True)``
   reads it) and restores them in ``before_train``, i.e. after everything that
   draws random numbers while the trainer is built and loaded, and after the train
   loader's iterator is created (creating it draws a torch seed). Evaluation during
   training (EvalHook) runs inside :func:`preserved_rng_state`, so it does not
   shift the training streams either. With several processes, each rank gets its
   own state back; that needs the same world size (otherwise a warning, and the
   RNGs stay as seeded). The multi-process path (gathering the states to rank 0)
   is exercised by ``tests/test_distributed.py``; an exact multi-process resume is
   not tested.

Limits (detectron2's, documented rather than fixed):

* RetinaNet keeps its loss normaliser (an EMA of the number of positive anchors,
  ``loss_normalizer``) as a plain attribute, not in its state_dict: a resumed
  RetinaNet (hence TBD) restarts it from its initial value 100, so its losses
  differ for the next iterations; RetinaNet resumes are not bit-exact (TBD
  quickstart resumed at iteration 2: loss_cls / loss_box_reg ~13 % lower at
  iterations 2-3, the distillation losses within 0.3 %, final weights within 6e-4).
* With DATALOADER.NUM_WORKERS > 0, augmentations run in worker processes that
  detectron2 re-seeds every time a loader starts: the resumed run sees the same
  images in the same order, but different random augmentations.
* With DATALOADER.ASPECT_RATIO_GROUPING, batches are formed from a buffer, so the
  number of consumed samples is only approximately ``start_iter * batch``;
  samplers seeded from the RNG (RandomSubsetTrainingSampler, the weighted ones) or
  ``SEED < 0`` continue with a different shuffle. In these cases a resume skips
  the right number of samples, but does not continue the stream exactly.
* Exactness also needs a deterministic run: fixed SEED, deterministic kernels, the
  same number of threads and devices.

Nothing here is specific to distillation: it serves any detectron2 model.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import random
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch
import detectron2.utils.comm as comm
from detectron2.config import CfgNode
from detectron2.data import build_detection_train_loader
from detectron2.data.build import _train_loader_from_config
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import HookBase
from torch.utils.data import Sampler

__all__ = [
    "get_rng_state",
    "set_rng_state",
    "preserved_rng_state",
    "RNGStateHook",
    "SkipSampler",
    "samples_consumed",
    "build_train_loader",
]

logger = logging.getLogger(__name__)


# ---- RNG state -----------------------------------------------------------------
def get_rng_state() -> Dict[str, Any]:
    """This process's torch (CPU, and CUDA when initialised), numpy and python RNG
    states, as tensors / ints / floats / tuples only (``torch.load(weights_only=True)``
    reads them back)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "python": (int(version), torch.tensor(internal, dtype=torch.int64), gauss_next),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal.tolist()), gauss_next))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            logger.warning(
                "Checkpoint has CUDA RNG states of %d devices, this process sees %d: not restored",
                len(cuda), torch.cuda.device_count(),
            )


@contextlib.contextmanager
def preserved_rng_state():
    """Run a block without changing this process's RNG streams (torch, numpy, python)."""
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


class RNGStateHook(HookBase):
    """Saves every rank's RNG states in the checkpoints and restores them on resume.

    ``state_dict()`` (called by the checkpointer through ``trainer.state_dict()``)
    returns ``{"world_size": W, "ranks": [state of rank 0, ..., rank W-1]}``. Only
    the main process saves checkpoints, so with W > 1 the ranks gather their states
    to rank 0 in ``after_step`` of each iteration the PeriodicCheckpointer saves at
    (register this hook just before it). ``load_state_dict`` only remembers the
    state; ``before_train`` restores this rank's entry, after the trainer is built
    and loaded. A checkpoint written with another world size is not restored (a
    warning says so): the per-rank streams cannot continue then.
    """

    def __init__(self, checkpoint_period: int):
        self._period = max(int(checkpoint_period), 1)
        self._gathered: Optional[tuple] = None  # (iteration, [per-rank states]) on rank 0
        self._pending: Optional[Dict[str, Any]] = None

    def _saves_at(self, it: int) -> bool:
        return (it + 1) % self._period == 0 or it >= self.trainer.max_iter - 1

    def after_step(self):
        if comm.get_world_size() > 1 and self._saves_at(self.trainer.iter):
            states = comm.gather(get_rng_state(), dst=0)
            if comm.is_main_process():
                self._gathered = (self.trainer.iter, states)

    def state_dict(self):
        world = comm.get_world_size()
        if world == 1:
            return {"world_size": 1, "ranks": [get_rng_state()]}
        if self._gathered is not None and self._gathered[0] == self.trainer.iter:
            return {"world_size": world, "ranks": list(self._gathered[1])}
        # a save outside the periodic schedule: only this rank's state is known
        return {"world_size": 1, "ranks": [get_rng_state()]}

    def load_state_dict(self, state_dict):
        self._pending = state_dict

    def before_train(self):
        state, self._pending = self._pending, None
        if not state:
            return
        world, rank = comm.get_world_size(), comm.get_rank()
        if int(state.get("world_size", 0)) != world or len(state.get("ranks", [])) != world:
            logger.warning(
                "RNG states in the checkpoint are for world size %s, this run has %d: not restored "
                "(the resumed run is not an exact continuation)", state.get("world_size"), world,
            )
            return
        set_rng_state(state["ranks"][rank])
        logger.info("Restored the RNG states of rank %d from the checkpoint", rank)


# ---- data ----------------------------------------------------------------------
class SkipSampler(Sampler):
    """``sampler``'s (infinite) index stream without its first ``skip`` indices."""

    def __init__(self, sampler: Sampler, skip: int):
        if skip < 0:
            raise ValueError(f"skip must be >= 0, got {skip}")
        self.sampler = sampler
        self.skip = int(skip)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)


def samples_consumed(cfg: CfgNode, iters: int) -> int:
    """Samples each rank's loader has consumed after ``iters`` iterations."""
    return iters * (cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size())


def build_train_loader(cfg: CfgNode, skip: int = 0):
    """detectron2's ``build_detection_train_loader(cfg)``, with two differences:
    the TrainingSampler's shuffle seed is cfg.SEED (when >= 0), and the sampler's
    first ``skip`` indices (of this rank's stream) are skipped (for a resume)."""
    kwargs = _train_loader_from_config(cfg)  # what build_detection_train_loader(cfg) uses
    sampler = kwargs["sampler"]
    if type(sampler) is TrainingSampler and cfg.SEED >= 0:
        sampler = TrainingSampler(len(kwargs["dataset"]), seed=cfg.SEED)
    if skip:
        if sampler is None:  # an IterableDataset: no sampler to advance
            logger.warning("The train dataset is iterable: a resumed run restarts its stream")
        else:
            sampler = SkipSampler(sampler, skip)
    kwargs["sampler"] = sampler
    return build_detection_train_loader(**kwargs)
