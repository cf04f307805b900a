"""The run cache: train-and-evaluate runs for the demo, the ablations and the benchmarks.

A run is (config file, opts, output dir). ``train_and_evaluate`` trains with
DistillTrainer, evaluates with the config's evaluators and writes
``results.json`` (metrics, wall time, the exact command that reproduces it). A
run whose ``results.json`` has the same *fingerprint* is not repeated (delete
the folder to redo it), whatever config file and opts spelled that config; with
``twins_under``, neither is a run whose twin (same fingerprint) finished in
another folder below it: its files are linked into the new folder. The fingerprint
is a hash of the fully merged config (so an edited YAML file invalidates the
cache), of the built-in dataset's version and, for distilled runs, of the teacher
checkpoint's bytes (a retrained teacher) and of every ``.py`` file of the
d2_distill package (changed distillation code; see :func:`source_digest`).
A stale folder is never overwritten: it is renamed to ``<folder>.stale-N``
before the run is redone.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.env import seed_all_rng

import d2_distill
from d2_distill.data import DATASET_VERSION
from d2_distill.engine import DistillTrainer, setup_cfg

__all__ = [
    "train_and_evaluate", "find_twin", "evaluate", "evaluate_cached", "evaluate_on", "ensure_trained", "flat_metrics", "fingerprint", "source_digest",
    "setup_logging", "console_and_log",
]

# under "d2_distill" so that its handler (setup_logging) shows the lab's messages too
logger = logging.getLogger("d2_distill.lab.runs")


def setup_logging() -> None:
    """Show detectron2's progress (ETA lines, evaluation tables) and d2_distill's
    messages (reused or stale runs) on the console, once per process."""
    from detectron2.utils.logger import setup_logger

    for name in ("detectron2", "d2_distill"):
        if not logging.getLogger(name).handlers:
            setup_logger(name=name)


class _ProgressOnly(logging.Filter):
    """Console filter of :func:`console_and_log`: training progress (the ETA lines
    and the training-speed summary), the lab's own messages and every warning."""

    KEEP = ("detectron2.utils.events", "detectron2.engine.hooks", "d2_distill.lab", "d2_distill.data",
            "d2_distill.modeling", "d2_distill.engine")

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name  # detectron2's console formatter renames "detectron2.x" records "d2.x" in place
        if name.startswith("d2."):
            name = "detectron2." + name[3:]
        return record.levelno >= logging.WARNING or name.startswith(self.KEEP)


@contextlib.contextmanager
def console_and_log(log_path: str, verbose: bool = False) -> Iterator[Callable[[str], None]]:
    """Everything detectron2 and d2_distill log goes to ``log_path`` (appended);
    unless ``verbose``, the console keeps only what :class:`_ProgressOnly` lets
    through, and what third-party code prints on stdout (pycocotools' "Loading and
    preparing results...") goes to the file too. Yields ``say(message)``, which
    prints on the console and writes to the file. Warnings (stderr) are untouched."""
    setup_logging()
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    console = sys.stdout
    loggers = [logging.getLogger(name) for name in ("detectron2", "d2_distill")]
    with open(log_path, "a") as log:
        to_file = logging.StreamHandler(log)
        to_file.setFormatter(logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s", "%m/%d %H:%M:%S"))
        on_console = [h for lg in loggers for h in lg.handlers
                      if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
        quiet = _ProgressOnly()
        for lg in loggers:
            lg.addHandler(to_file)
        if not verbose:
            for h in on_console:
                h.addFilter(quiet)

        def say(message: str) -> None:
            print(message, file=console, flush=True)
            print(message, file=log, flush=True)

        try:
            with contextlib.redirect_stdout(console if verbose else log):
                yield say
        finally:
            for lg in loggers:
                lg.removeHandler(to_file)
            for h in on_console:
                h.removeFilter(quiet)


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


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(cfg) -> str:
    """sha256 of what determines a run's result: the merged config (minus the
    device and the output folder, which do not, and for a plain model the DISTILL
    options other than DISTILL.EVAL, which it never reads), the built-in dataset's version
    and, for a distiller, the teacher checkpoint's bytes and d2_distill's sources."""
    def plain(x):  # CfgNode -> dict, tuple -> list: a dump-independent canonical form
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return [plain(v) for v in x] if isinstance(x, (list, tuple)) else x

    c = plain(cfg)
    c["MODEL"]["DEVICE"], c["OUTPUT_DIR"] = "", ""
    if c["MODEL"]["META_ARCHITECTURE"] != "Distiller" and "DISTILL" in c:
        # a plain model's training reads no DISTILL option (only its evaluation reads
        # DISTILL.EVAL): a new distillation option must not retrain the teachers
        c["DISTILL"] = {"EVAL": c["DISTILL"].get("EVAL", {})}
    h = hashlib.sha256(json.dumps(c, sort_keys=True).encode())
    h.update(f"shapes dataset {DATASET_VERSION}".encode())
    if c["MODEL"]["META_ARCHITECTURE"] == "Distiller":
        teacher = c["DISTILL"]["TEACHER"]["WEIGHTS"]
        if teacher and os.path.isfile(teacher):
            h.update(_file_sha256(teacher).encode())
        h.update(source_digest().encode())  # the distillation code itself
    return h.hexdigest()


def package_sources(root: Optional[str] = None) -> List[str]:
    """Every ``.py`` file under the d2_distill package folder (``root``), found by
    walking it: a new module or sub-package is hashed without anyone listing it.
    No file is left out, export included (simpler than a rule that could be wrong)."""
    root = root or os.path.dirname(os.path.abspath(d2_distill.__file__))
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        paths += [os.path.join(folder, f) for f in files if f.endswith(".py")]
    return sorted(paths)


@functools.lru_cache(maxsize=None)
def source_digest(root: Optional[str] = None) -> str:
    """sha256 of d2_distill's sources (:func:`package_sources`, relative paths and
    bytes): a distilled run made by other code is redone. Plain detectron2 runs
    (teachers, plain students) do not use it, so editing d2_distill does not
    retrain them."""
    root = root or os.path.dirname(os.path.abspath(d2_distill.__file__))
    h = hashlib.sha256()
    for path in package_sources(root):
        h.update(os.path.relpath(path, root).encode())
        h.update(_file_sha256(path).encode())
    return h.hexdigest()


def _set_aside(folder: str, why: str) -> str:
    """Rename a stale run folder to ``<folder>.stale-N`` (nothing is deleted)."""
    n = 1
    while os.path.exists(f"{folder}.stale-{n}"):
        n += 1
    os.rename(folder, f"{folder}.stale-{n}")
    logger.warning("%s: %s; moved it to %s.stale-%d", folder, why, folder, n)
    return f"{folder}.stale-{n}"


def _as_requested(record: Dict, config_file: str, opts: List[str]) -> Dict:
    """A cached ``record`` restated with the config file and opts this caller asked
    for (same fingerprint, so the same run); the command it was made with stays
    under ``reused_from`` when it differs."""
    if record.get("config_file") == config_file and record.get("opts") == opts:
        return record
    made_by = record.get("reused_from") or record.get("command")
    return {**record, "config_file": config_file, "opts": opts, "command": _command(config_file, opts),
            "reused_from": made_by}


def find_twin(root: str, key: str, skip: str = "") -> Optional[str]:
    """A finished run below ``root`` (not ``skip``, not a set-aside ``.stale-N``
    folder) whose ``results.json`` has fingerprint ``key`` and whose
    ``model_final.pth`` is there; ``None`` if there is none."""
    skip = os.path.abspath(skip) if skip else ""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if ".stale-" not in d)
        if "results.json" not in files or "model_final.pth" not in files or os.path.abspath(folder) == skip:
            continue
        try:
            with open(os.path.join(folder, "results.json")) as f:
                if json.load(f).get("fingerprint") == key:
                    return folder
        except (OSError, ValueError):  # a results.json being written or broken: not a twin
            continue
    return None


def _adopt(twin: str, output_dir: str, config_file: str, opts: List[str]) -> Dict:
    """Make ``output_dir`` hold the finished run ``twin`` (its top-level files,
    hard-linked where the file system allows, else copied) and return its record
    restated for this request (:func:`_as_requested`, ``reused_from`` = ``twin``).
    What an unfinished run left in ``output_dir`` is set aside first, not mixed in."""
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        _set_aside(output_dir, "an unfinished run (no results.json) is there")
    os.makedirs(output_dir)
    for name in sorted(os.listdir(twin)):
        src, dst = os.path.join(twin, name), os.path.join(output_dir, name)
        if name == "results.json" or not os.path.isfile(src):
            continue
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    with open(os.path.join(twin, "results.json")) as f:
        record = {**_as_requested(json.load(f), config_file, opts), "reused_from": twin}
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(record, f, indent=1)
    logger.info("Reusing %s for %s: it was trained with the same config (fingerprint)", twin, output_dir)
    return record


def train_and_evaluate(
    config_file: str, opts: Sequence[str], output_dir: str, *, force: bool = False, twins_under: str = ""
) -> Dict:
    opts = [str(o) for o in opts] + ["OUTPUT_DIR", output_dir]
    path = os.path.join(output_dir, "results.json")
    cfg = setup_cfg(config_file, opts)
    key = fingerprint(cfg)
    if not force and os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("fingerprint") == key:
            logger.info("Reusing %s", path)
            return _as_requested(cached, config_file, opts)
        _set_aside(output_dir, "it was made with another config, teacher checkpoint or distillation code")
    if not force and twins_under:
        twin = find_twin(twins_under, key, skip=output_dir)
        if twin:
            return _adopt(twin, output_dir, config_file, opts)
    os.makedirs(output_dir, exist_ok=True)
    # As train_net.py's default_setup does: the run is a function of SEED, not of
    # what this process ran before (model init and augmentation draw from these RNGs).
    seed_all_rng(cfg.SEED if cfg.SEED >= 0 else None)
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
        "fingerprint": key,
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
    """Evaluate a trained model (no training) with the config's evaluators. Unless
    ``opts`` set OUTPUT_DIR, the evaluators write into a temporary folder, removed
    afterwards: evaluating a teacher leaves nothing beside its checkpoint, and two
    processes evaluating the same teacher (a benchmark and a test) do not write
    the same prediction files."""
    opts = list(opts)
    with tempfile.TemporaryDirectory(prefix="d2_distill_eval_") as scratch:
        if "OUTPUT_DIR" not in opts[::2]:
            opts += ["OUTPUT_DIR", scratch]
        cfg = setup_cfg(config_file, opts + ["MODEL.WEIGHTS", weights])
        model = DistillTrainer.build_model(cfg)
        DetectionCheckpointer(model).load(weights)
        return flat_metrics(DistillTrainer.test(cfg, model))


def evaluate_cached(config_file: str, opts: Sequence[str], weights: str) -> Dict[str, float]:
    """:func:`evaluate`, remembered beside ``weights`` in ``eval_<key>.json``, where
    the key hashes the merged config, the checkpoint's bytes and d2_distill's sources
    (the evaluators live there): a teacher evaluated once is not evaluated again by
    the next demo or benchmark, and a retrained teacher, another setting or changed
    evaluation code gets a new key. A folder that cannot be written is skipped."""
    cfg = setup_cfg(config_file, list(opts) + ["MODEL.WEIGHTS", weights])
    key = hashlib.sha256("|".join((fingerprint(cfg), _file_sha256(weights), source_digest())).encode()).hexdigest()
    path = os.path.join(os.path.dirname(os.path.abspath(weights)), f"eval_{key[:16]}.json")
    if os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            logger.info("Reusing the evaluation of %s in %s", weights, path)
            return cached["metrics"]
    metrics = evaluate(config_file, opts, weights)
    try:
        with open(path, "w") as f:
            json.dump({"key": key, "config_file": config_file, "opts": list(opts), "weights": weights,
                       "metrics": metrics}, f, indent=1)
    except OSError as e:
        logger.info("Could not remember the evaluation in %s: %s", path, e)
    return metrics


def evaluate_on(record: Dict, dataset: str) -> Dict[str, float]:
    """Metrics of a finished run's final weights on another ``dataset`` (no training):
    the run's own config file and opts, with ``DATASETS.TEST`` replaced. One
    training thus serves a tuning split and the reported split. The result is
    cached beside the run, ``eval_<dataset>.json``, under the run's fingerprint: a
    run retrained since (another fingerprint) is evaluated again. The console shows
    one line per evaluation; detectron2's log of it (the per-category tables) goes to
    ``eval_<dataset>/log.txt``.

    ``record``: what :func:`train_and_evaluate` returned (``config_file``, ``opts``
    with the run's ``OUTPUT_DIR``, ``fingerprint``)."""
    opts = list(record["opts"])
    folder = opts[max(i for i, o in enumerate(opts[:-1]) if o == "OUTPUT_DIR") + 1]  # the last one wins
    path = os.path.join(folder, f"eval_{dataset}.json")
    if os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("fingerprint") == record["fingerprint"]:
            logger.info("Reusing %s", path)
            return cached["metrics"]
    out = os.path.join(folder, f"eval_{dataset}")
    opts += ["DATASETS.TEST", f"('{dataset}',)", "OUTPUT_DIR", out]
    with console_and_log(os.path.join(out, "log.txt")) as say:  # the evaluator's tables go to the file
        metrics = evaluate(record["config_file"], opts, os.path.join(folder, "model_final.pth"))
        say(f"[lab] {folder}: AP {metrics.get('AP', float('nan')):.2f} on {dataset} "
            f"(detectron2's tables: {os.path.join(out, 'log.txt')})")
    with open(path, "w") as f:
        json.dump({"dataset": dataset, "fingerprint": record["fingerprint"], "metrics": metrics}, f, indent=1)
    return metrics


def _trained_with(folder: str) -> Optional[str]:
    """Fingerprint of the config a finished training in ``folder`` used: from its
    results.json, else from the config.yaml that ``train_net.py`` dumps there."""
    results = os.path.join(folder, "results.json")
    if os.path.isfile(results):
        with open(results) as f:
            key = json.load(f).get("fingerprint")
        if key:
            return key
    dumped = os.path.join(folder, "config.yaml")
    if os.path.isfile(dumped):
        return fingerprint(setup_cfg(dumped))
    return None


def ensure_trained(config_file: str, opts: Optional[List[str]] = None) -> str:
    """Train ``config_file`` into its OUTPUT_DIR unless a ``model_final.pth`` trained
    with the same config is there; return its path. A checkpoint trained with another
    config (an edited YAML file) is set aside, not reused and not overwritten."""
    cfg = setup_cfg(config_file, list(opts or []))
    final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    if os.path.isfile(final):
        used = _trained_with(cfg.OUTPUT_DIR)
        if used is None:
            logger.warning("Reusing %s: no results.json or config.yaml beside it to check its config", final)
            return final
        if used == fingerprint(cfg):
            logger.info("Reusing %s", final)
            return final
        _set_aside(cfg.OUTPUT_DIR, f"{final} was trained with another config than {config_file}")
    logger.info("Training %s into %s", config_file, cfg.OUTPUT_DIR)
    train_and_evaluate(config_file, list(opts or []), cfg.OUTPUT_DIR, force=True)
    return final
