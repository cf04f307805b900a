"""The lab's tables: which distilled configs exist, their teachers and plain
students, the rows of a comparison, schedules and run folders.

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
a row). Each row has a display label and a stable id (its run folder).

Beside it: :mod:`.runs` (the run cache), :mod:`.parallel` (``--jobs``),
:mod:`.stats` (statistics over seeds, JSON), :mod:`.cli` (shared arguments).
"""
from __future__ import annotations

import functools
import glob
import math
import os
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
