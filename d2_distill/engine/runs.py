"""Train-and-evaluate runs with caching, for the demo, the ablations and the benchmarks.

A run is (config file, opts, output dir). ``train_and_evaluate`` trains with
DistillTrainer, evaluates with the config's evaluators and writes
``results.json`` (metrics, wall time, the exact command that reproduces it). A
run whose ``results.json`` exists and was made with the same config and opts is
not repeated: delete the folder to redo it.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Dict, List, Optional, Sequence

from detectron2.checkpoint import DetectionCheckpointer

from .trainer import DistillTrainer, setup_cfg

__all__ = ["train_and_evaluate", "evaluate", "ensure_trained", "flat_metrics"]

logger = logging.getLogger("d2_distill.runs")


def _command(config_file: str, opts: Sequence[str]) -> str:
    quoted = [f'"{o}"' if any(c in str(o) for c in " ()[],'") else str(o) for o in opts]
    return " ".join(["python train_net.py --config-file", config_file, *quoted])


def flat_metrics(results: Dict) -> Dict[str, float]:
    """{'bbox': {'AP': ..}, 'harmony': {...}} -> {'AP': .., 'AP50': .., 'harmonious_ratio': ..}."""
    out: Dict[str, float] = {}
    for task, metrics in results.items():
        if isinstance(metrics, dict):
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and "-" not in k:  # skip per-category "AP-circle"
                    out[k if task in ("bbox", "harmony") else f"{task}/{k}"] = float(v)
    return out


def train_and_evaluate(
    config_file: str, opts: Sequence[str], output_dir: str, *, force: bool = False
) -> Dict:
    opts = [str(o) for o in opts] + ["OUTPUT_DIR", output_dir]
    path = os.path.join(output_dir, "results.json")
    if not force and os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("config_file") == config_file and cached.get("opts") == opts:
            logger.info("Reusing %s", path)
            return cached
    cfg = setup_cfg(config_file, opts)
    os.makedirs(output_dir, exist_ok=True)
    start = time.perf_counter()
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    train_s = time.perf_counter() - start
    results = getattr(trainer, "_last_eval_results", None) or DistillTrainer.test(cfg, trainer.model)
    record = {
        "config_file": config_file,
        "opts": opts,
        "command": _command(config_file, opts),
        "train_and_eval_seconds": round(time.perf_counter() - start, 1),
        "train_seconds": round(train_s, 1),
        "max_iter": cfg.SOLVER.MAX_ITER,
        "metrics": flat_metrics(results),
        "loss_history": {
            k: [[it, float(v)] for v, it in trainer.storage.history(k).values()]
            for k in trainer.storage.histories()
            if k.startswith("loss_") or k == "total_loss"
        },
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    return record


def evaluate(config_file: str, opts: Sequence[str], weights: str) -> Dict[str, float]:
    """Evaluate a trained model (no training) with the config's evaluators."""
    cfg = setup_cfg(config_file, list(opts) + ["MODEL.WEIGHTS", weights])
    model = DistillTrainer.build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    return flat_metrics(DistillTrainer.test(cfg, model))


def ensure_trained(config_file: str, opts: Optional[List[str]] = None) -> str:
    """Train ``config_file`` into its OUTPUT_DIR unless ``model_final.pth`` is there; return its path."""
    cfg = setup_cfg(config_file, list(opts or []))
    final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    if os.path.isfile(final):
        logger.info("Reusing %s", final)
        return final
    logger.info("Training %s into %s", config_file, cfg.OUTPUT_DIR)
    train_and_evaluate(config_file, list(opts or []), cfg.OUTPUT_DIR, force=True)
    return final
