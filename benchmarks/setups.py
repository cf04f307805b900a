"""What the demo and the benchmarks share: the lab's tables, method discovery,
ablation rows, schedules, run folders and command-line helpers.

Methods are discovered, not listed. A *setup* is one distilled quickstart config:
a ``configs/quickstart/*.yaml`` (not ``Base-*``) whose merged config has
``MODEL.META_ARCHITECTURE: Distiller`` and a ``DISTILL.METHOD`` that names a
method of ``d2_distill.methods.DISTILL_METHOD_REGISTRY`` (its ``name``). Its teacher is the config's own
``DISTILL.TEACHER.CONFIG_FILE``; its plain student (the same model trained
without a teacher) comes from :data:`PLAIN_STUDENTS`, keyed by the student's
meta-architecture. A new method with a quickstart config is picked up by every
script here without an edit.

Ablation rows of a setup (:func:`ablation_rows`): the plain student;
``+ <component>`` for every entry of the method's ``components`` (the other
components' weights set to 0; only when it has more than one); the full method;
then the method's rows of :data:`EXTRA_ROWS` (lab data: claims of a paper worth
a row). A method without an entry there still gets plain / + components / full.
"""
from __future__ import annotations

import argparse
import functools
import glob
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QS = "configs/quickstart"  # repository-relative: the run cache keys on these paths

# The plain student of each student meta-architecture: the model of the distilled
# configs' students, trained alone on the same schedule.
PLAIN_STUDENTS: Dict[str, str] = {
    "GeneralizedRCNN": f"{QS}/faster_rcnn_R18_FPN_student.yaml",
    "RetinaNet": f"{QS}/retinanet_R18_FPN_student.yaml",
}

# Every lab run also measures the harmony of its detections (cheap; TBD's claim).
EVAL_OPTS = ["DISTILL.EVAL.HARMONY", "True"]

OptsLike = Union[Sequence[str], Callable[["object"], List[str]]]


def iters_per_epoch(cfg) -> int:
    """Iterations of one pass over the training split at the config's batch size."""
    from d2_distill.data import SPLITS

    images = sum(SPLITS[name]["num_images"] for name in cfg.DATASETS.TRAIN)
    return max(1, math.ceil(images / cfg.SOLVER.IMS_PER_BATCH))


# Method-specific rows beyond plain / + components / full, keyed by DISTILL.METHOD:
# (label, opts) where opts is a list or a function of the row's merged config.
# A row whose option the config does not have is skipped with a note.
EXTRA_ROWS: Dict[str, List[tuple]] = {
    "TAR": [
        ("no decay", ["DISTILL.SCHEDULE.KIND", "constant"]),
        ("linear decay (per iteration)", ["DISTILL.SCHEDULE.KIND", "linear"]),
        ("step decay (per epoch)", lambda cfg: ["DISTILL.SCHEDULE.KIND", "step",
                                                "DISTILL.SCHEDULE.ITERS_PER_EPOCH", str(iters_per_epoch(cfg))]),
        ("REG_GATE proposal", ["DISTILL.TAR.REG_GATE", "proposal"]),
        ("REG_GATE student", ["DISTILL.TAR.REG_GATE", "student"]),
        *[(f"FEAT_WEIGHT {w}", ["DISTILL.TAR.FEAT_WEIGHT", w]) for w in ("0.25", "0.5", "1.0", "2.0")],
    ],
    "TBD": [
        ("HD uniform weights", ["DISTILL.TBD.HD_WEIGHTING", "uniform"]),
        ("TFD_BALANCE fixed", ["DISTILL.TBD.TFD_BALANCE", "fixed"]),
    ],
}


# ---------------------------------------------------------------------------
# setups
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    """One distilled quickstart config and the runs it is compared with."""

    method: str  # DISTILL.METHOD, as registered (e.g. "TAR")
    config: str  # the distilled config, repository-relative
    arch: str  # DISTILL.STUDENT_META_ARCHITECTURE
    teacher_config: str  # DISTILL.TEACHER.CONFIG_FILE
    plain_config: str  # PLAIN_STUDENTS[arch]

    @property
    def key(self) -> str:
        """The config's file stem, e.g. ``tar_faster_rcnn``: names its runs."""
        return os.path.splitext(os.path.basename(self.config))[0]

    @property
    def method_cls(self):
        from d2_distill.methods import method_class

        return method_class(self.method)


def _rel(path: str) -> str:
    full = path if os.path.isabs(path) else os.path.join(ROOT, path)
    return os.path.relpath(full, ROOT) if os.path.isfile(full) else path


@functools.lru_cache(maxsize=None)
def distilled_configs(folder: str = QS):
    """[(repository-relative path, merged config)] of the configs in ``folder`` whose
    MODEL.META_ARCHITECTURE is Distiller and whose DISTILL.METHOD is registered.
    ``Base-*.yaml`` files are skipped: by detectron2's convention they are ``_BASE_``
    parts of other configs, not configs to train. Read once per process."""
    from d2_distill.engine import setup_cfg
    from d2_distill.methods import method_names

    registered, out = method_names(), []
    for path in sorted(glob.glob(os.path.join(ROOT, folder, "*.yaml"))):
        if os.path.basename(path).startswith("Base-"):
            continue
        cfg = setup_cfg(path)
        if cfg.MODEL.META_ARCHITECTURE == "Distiller" and cfg.DISTILL.METHOD in registered:
            out.append((os.path.relpath(path, ROOT), cfg))
    return tuple(out)


def discover_setups(folder: str = QS) -> Dict[str, List[Setup]]:
    """{method name in lower case: [its setups, by config file name]} for the
    distilled configs in ``folder`` whose student meta-architecture has a plain
    student in :data:`PLAIN_STUDENTS`."""
    out: Dict[str, List[Setup]] = {}
    for path, cfg in distilled_configs(folder):
        arch = cfg.DISTILL.STUDENT_META_ARCHITECTURE
        if arch in PLAIN_STUDENTS:  # otherwise there is no plain student to compare with
            setup = Setup(cfg.DISTILL.METHOD, path, arch, _rel(cfg.DISTILL.TEACHER.CONFIG_FILE), PLAIN_STUDENTS[arch])
            out.setdefault(setup.method.lower(), []).append(setup)
    return out


def find_setup(setups: Dict[str, List[Setup]], method: str, config: str = "") -> Setup:
    """The setup of ``method`` (any case) whose config is ``config`` (a path or a
    file stem); the first one when ``config`` is empty. KeyError says what exists."""
    choices = setups.get(method.lower())
    if not choices:
        raise KeyError(f"no quickstart config for method {method!r}; methods with one: {', '.join(sorted(setups))}")
    if not config:
        return choices[0]
    for s in choices:
        if config in (s.key, s.config, os.path.basename(s.config)) or _rel(config) == s.config:
            return s
    raise KeyError(f"{config!r} is not a config of {method}; choose from {', '.join(s.key for s in choices)}")


# ---------------------------------------------------------------------------
# rows, schedules, folders
# ---------------------------------------------------------------------------
@dataclass
class Row:
    """One trained model of a comparison: its display label (``name``), its stable
    ``id`` (run folder name, ``--rows`` argument, what tables key on; by default
    the label made file-safe), its config, its opts, its run folder group."""

    name: str
    config: str
    opts: OptsLike = field(default_factory=list)
    distilled: bool = True
    group: str = ""  # run folder group: the config stem
    id: str = ""

    def __post_init__(self):
        if not self.group:
            self.group = os.path.splitext(os.path.basename(self.config))[0]
        if not self.id:
            self.id = slug(self.name)

    def resolve_opts(self, cfg) -> List[str]:
        return list(self.opts(cfg) if callable(self.opts) else self.opts)


PLAIN_ID = "plain_student"  # the id of every plain-student row (tables compare against it)


def plain_row(setup: Setup) -> Row:
    return Row("plain student", setup.plain_config, [], distilled=False, id=PLAIN_ID)


def full_row(setup: Setup) -> Row:
    return Row(f"full {setup.method}", setup.config)


def ablation_rows(setup: Setup, extra: bool = True) -> List[Row]:
    """plain, ``+ <component>`` per component (when there are several), full, the
    method's :data:`EXTRA_ROWS` (with ``extra``)."""
    rows = [plain_row(setup)]
    components = dict(setup.method_cls.components)
    if len(components) > 1:
        for label, key in components.items():
            zeroed = [x for other, k in components.items() if other != label for x in (k, "0.0")]
            rows.append(Row(f"+ {label}", setup.config, zeroed))
    rows.append(full_row(setup))
    if extra:
        rows += [Row(f"full {setup.method}, {label}", setup.config, opts)
                 for label, opts in EXTRA_ROWS.get(setup.method, [])]
    return rows


def schedule_opts(iters: int, seed: int) -> List[str]:
    """The student schedule: LR drops (x0.1) at 75 % and 92 % of ``iters``."""
    steps = sorted({s for s in (int(iters * 0.75), int(iters * 0.92)) if 0 < s < iters})
    text = "(" + ", ".join(map(str, steps)) + ("," if len(steps) == 1 else "") + ")"
    return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", text, "SEED", str(seed)]


def default_iters(setup: Setup) -> int:
    """The plain student config's SOLVER.MAX_ITER: the schedule the quickstart is sized for."""
    from d2_distill.engine import setup_cfg

    return setup_cfg(os.path.join(ROOT, setup.plain_config)).SOLVER.MAX_ITER


def slug(name: str) -> str:
    return name.replace("+ ", "").replace(",", "").replace("(", "").replace(")", "").replace(" ", "_")


def run_folder(output: str, row: Row, iters: int, seed: int) -> str:
    """``<output>/<config stem>/iters<N>_seed<S>/<row>``: the plain student's runs
    are shared by every method with that student."""
    return os.path.join(output, row.group, f"iters{iters}_seed{seed}", row.id)


def row_opts(row: Row, iters: int, seed: int, teacher: str, extra: Sequence[str] = ()) -> List[str]:
    """The opts a row trains with: schedule, lab evaluation, the row's own, the
    caller's, and the teacher checkpoint (distilled rows)."""
    from d2_distill.engine import setup_cfg

    opts = schedule_opts(iters, seed) + EVAL_OPTS + list(extra)
    if callable(row.opts):
        opts += row.resolve_opts(setup_cfg(os.path.join(ROOT, row.config), opts))
    else:
        opts += list(row.opts)
    return opts + (["DISTILL.TEACHER.WEIGHTS", teacher] if row.distilled else [])


def train_row(row: Row, output: str, iters: int, seed: int, teacher: str, extra: Sequence[str] = ()) -> Dict:
    """Train and evaluate one row through the run cache; returns its record plus ``run``."""
    from .runs import train_and_evaluate

    folder = run_folder(output, row, iters, seed)
    rec = train_and_evaluate(row.config, row_opts(row, iters, seed, teacher, extra), folder, twins_under=output)
    return {**rec, "run": folder}


def _train_in_worker(threads: int, quiet: bool, config: str, opts: List[str], folder: str, output: str) -> str:
    """One run in a worker process of :func:`train_parallel`, with ``threads`` torch
    threads; ``quiet``: the console as the demo's (:func:`benchmarks.runs.console_and_log`),
    the whole log in the run folder's ``log.txt``."""
    import contextlib

    import torch

    from .runs import console_and_log, setup_logging, train_and_evaluate

    torch.set_num_threads(threads)
    setup_logging()  # console_and_log filters the handlers this installs
    with console_and_log(os.path.join(folder, "log.txt")) if quiet else contextlib.nullcontext():
        train_and_evaluate(config, opts, folder, twins_under=output)
    return folder


def _die_with_parent(parent: int) -> None:
    """Initializer of :func:`train_parallel`'s workers: on Linux, ask the kernel to
    send this worker SIGTERM when the process that started it exits, however it
    exits. Without it a ``kill`` of the benchmark alone (SIGTERM or SIGKILL to its
    pid, not its process group, as a job queue or a timeout does) leaves the workers
    training on, unseen, into run folders that a rerun then trains into as well.
    (Ctrl-C reaches the whole process group and needs none of this.)"""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def train_parallel(work: Sequence[tuple], jobs: int, quiet: bool = False) -> None:
    """Train the runs of ``work`` (``(row, output, iters, seed, teacher, extra)``, the
    arguments of :func:`train_row`) ``jobs`` at a time, each in its own process with
    ``cores // jobs`` torch threads; finished runs are reused there as everywhere.
    The callers then read every record through :func:`train_row` (cached by then).
    ``quiet``: each worker's console shows progress and warnings only, its whole log
    going to the run folder's ``log.txt`` (the demo's console).
    ``jobs <= 1`` does nothing: ``train_row`` trains in this process. A run that fails
    stops the runs not yet started and raises; the finished ones stay cached. The
    workers end with this process, even when it is killed (:func:`_die_with_parent`).

    Why: a CPU training step does not scale linearly with threads, so on 2 cores two
    one-thread runs side by side finish more runs per hour than one two-thread run."""
    if jobs <= 1 or not work:
        return
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    threads = max(1, cpu_cores() // jobs)
    tasks = [(row.config, row_opts(row, iters, seed, teacher, extra), run_folder(output, row, iters, seed), output)
             for row, output, iters, seed, teacher, extra in work]
    seen, unique = set(), []
    for t in tasks:  # two rows with one folder (a restated default) train once
        if t[2] not in seen:
            seen.add(t[2])
            unique.append(t)
    with ProcessPoolExecutor(min(jobs, len(unique)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(_train_in_worker, threads, quiet, *t): t[2] for t in unique}
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for f in pending:
            f.cancel()
        for f in done:
            if f.exception() is not None:
                raise RuntimeError(f"training {futures[f]} failed: {f.exception()!r}") from f.exception()


def ensure_teacher(setup: Setup, weights: str = "", opts: Sequence[str] = ()) -> str:
    """``weights`` if given, else the quickstart teacher (its config plus ``opts``),
    trained first if needed."""
    from .runs import ensure_trained

    return weights or ensure_trained(setup.teacher_config, list(opts))


def evaluate_teacher(setup: Setup, weights: str, extra: Sequence[str] = ()) -> Dict[str, float]:
    """The teacher's metrics on the same validation split and evaluators as the students
    (evaluated once per checkpoint and setting, see :func:`benchmarks.runs.evaluate_cached`)."""
    from .runs import evaluate_cached

    return evaluate_cached(setup.teacher_config, EVAL_OPTS + list(extra), weights)


# ---------------------------------------------------------------------------
# statistics and command-line helpers
# ---------------------------------------------------------------------------
def mean_sd(values: Sequence[Optional[float]]):
    """(mean, sample standard deviation) over seeds; sd is 0 for one value; NaN if any is missing."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if len(vals) != len(values) or not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def gap_closed(row: float, plain: float, teacher: float) -> float:
    """(row − plain) / (teacher − plain) in %: the share of the teacher–student gap a
    distilled student closes; NaN when the teacher is not above the plain student."""
    gap = teacher - plain
    return 100.0 * (row - plain) / gap if gap > 0 else float("nan")


def fmt(v: Optional[float], signed: bool = False, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def json_safe(x):
    """NaN/inf -> None, so the file is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def report(path: str, summary, table: str) -> None:
    """What a lab script ends with: ``summary`` as strict JSON to ``path``, then its
    markdown ``table`` and where the JSON went on stdout."""
    write_json(path, summary)
    print(table)
    print(f"\nwritten {path}")


def write_json(path: str, obj) -> None:
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(json_safe(obj), f, indent=1)


def add_opts_argument(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("opts", nargs=argparse.REMAINDER, help=help + " (KEY VALUE ..., after -- when they follow a list option)")


def add_jobs_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs", type=int, default=1,
                   help="student runs trained at a time, each in its own process with cores/jobs torch "
                        "threads (default 1: one at a time in this process; 2 suits a 2-core machine)")


def check_opts(p: argparse.ArgumentParser, args) -> None:
    """Drop a leading ``--`` from ``args.opts``; they must be KEY VALUE pairs."""
    if args.opts and args.opts[0] == "--":
        args.opts = args.opts[1:]
    if len(args.opts) % 2:
        p.error(f"opts must be KEY VALUE pairs, got {args.opts}")


def check_positive(p: argparse.ArgumentParser, flag: str, value) -> None:
    if value is not None and value <= 0:
        p.error(f"{flag} must be positive, got {value}")


def check_choices(p: argparse.ArgumentParser, flag: str, values: Sequence[str], choices) -> List[str]:
    """``values`` without repeats (order kept); a usage error names any not in ``choices``."""
    unknown = [v for v in values if v not in choices]
    if unknown:
        p.error(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(choices)}")
    return list(dict.fromkeys(values))


def check_seeds(p: argparse.ArgumentParser, seeds: Sequence[int]) -> None:
    if len(set(seeds)) != len(seeds):
        p.error(f"--seeds: repeated seed in {list(seeds)}")
    negative = [s for s in seeds if s < 0]
    if negative:
        p.error(f"--seeds must be >= 0 (detectron2 draws a random seed for a negative SEED), got {negative}")


def check_file(p: argparse.ArgumentParser, flag: str, path: str) -> None:
    if path and "://" not in path and not os.path.isfile(path):
        p.error(f"{flag}: no such file {path!r}")


def check_repo_root() -> None:
    """The run cache keys on repository-relative config paths: run from the root."""
    if not os.path.isfile(os.path.join(QS, os.path.basename(PLAIN_STUDENTS["GeneralizedRCNN"]))):
        raise SystemExit(f"run from the repository root ({ROOT}), as python -m benchmarks.<script>; "
                         f"the current folder is {os.getcwd()}")
