"""What a distillation training step costs, next to what it cannot avoid.

    python -m benchmarks.step_cost                           # every distilled quickstart and COCO config
    python -m benchmarks.step_cost --pairs tar_faster_rcnn tbd_retinanet --iters 5
    python -m benchmarks.step_cost --pairs tar_faster_rcnn_R50_from_R101 -- DISTILL.TAR.PROPOSALS both

A *pair* is a distilled config, named by its file stem: every
``configs/quickstart/*.yaml`` and ``configs/COCO/*.yaml`` whose method is
registered (``benchmarks.setups.distilled_configs``), so a new method's configs
are measured without an edit here. For every pair, in one process and
interleaved (a, b, c, a, b, c, ... after warm-up, on the same fixed batch), it
measures the wall time and peak memory of

  (a) a plain student training step: ``model.student`` alone, forward +
      backward + SGD step;
  (b) the teacher alone, as the distiller runs it for every method, without
      grad: its preprocessing and its backbone;
  (h) the teacher work the method declares it needs beyond the backbone,
      ``model.method.teacher_heads(step)`` without grad, on a step recorded from
      one training forward of the same batch (TAR: the teacher's box head on the
      student's sampled RoIs; TBD: the teacher's dense head on every level;
      feature methods: nothing);
  (c) a full distillation training step: the Distiller in train mode, forward +
      backward + SGD step over the student and the adapters.

and reports the medians, c / (a + b + h) (1.0 = distillation costs nothing
beyond the work it cannot avoid) beside c / (a + b), where the excess
c - (a + b + h) goes (``BREAKDOWN``: timers around the teacher's calls, the
student's forward, the method's forward, and the forward / backward / SGD
split of a and c), and peak memory per phase: on CUDA
``torch.cuda.max_memory_allocated`` (reset per phase), on CPU the peak growth
of the resident set size during the phase, sampled by a background thread from
/proc/self/statm. No phase knows which method it measures.

Teachers get random weights (a random checkpoint of the teacher's config in a
temporary folder; cost does not depend on the values), students are random.
Models with FrozenBN (the model-zoo configs) get their frozen statistics set
from the batch (``calibrate_frozen_bn``): with identity statistics a random
R50/R101 proposes mostly degenerate boxes and a two-stage method's RoI
workload would be far below a trained model's.
The batch is the first ``--batch`` images of the built-in ``shapes_val`` split,
mapped by detectron2's DatasetMapper in training mode and resized to the pair's
input size. ``--lr`` is 0 by default: the SGD step does exactly the same work,
and the random models stay fixed, so every measured iteration sees the same
proposals and the same amount of work.

The model-zoo-sized pairs (R101 teachers) need a GPU to be measured in
reasonable time.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import threading
import time
from typing import Dict, List, Optional

import torch

from . import cli, setups as lab, stats

ROOT = lab.ROOT
SIZE_KINDS = {"configs/quickstart": "quickstart", "configs/COCO": "coco"}  # folder -> which size option applies
PHASES = ("a", "b", "h", "c")
PHASE_NAMES = {
    "a": "plain student step",
    "b": "teacher preprocess + backbone (no grad)",
    "h": "the teacher heads the method needs (method.teacher_heads, no grad)",
    "c": "distillation step",
}


def discover_pairs() -> Dict[str, tuple]:
    """{config stem: (distilled config, size kind)} of every distilled config with a registered method."""
    return {os.path.splitext(os.path.basename(path))[0]: (path, kind)
            for folder, kind in SIZE_KINDS.items() for path, _ in lab.distilled_configs(folder)}
RSS_SAMPLE_S = 0.002  # CPU memory sampling interval


# ---------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------
def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pairs = discover_pairs()
    p.add_argument("--pairs", nargs="+", default=list(pairs), metavar="PAIR",
                   help=f"pairs to measure, any of {', '.join(pairs)} (default: all)")
    p.add_argument("--iters", type=int, default=10, help="measured iterations per phase (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up iterations per phase, not measured (default 2)")
    p.add_argument("--memory-iters", type=int, default=1,
                   help="iterations per phase measuring peak memory, after the timed ones (default 1)")
    p.add_argument("--batch", type=int, default=2, help="images per step (default 2)")
    p.add_argument("--quickstart-size", type=int, default=0,
                   help="input short side of the quickstart pairs, px (default 0: each config's INPUT.MIN_SIZE_TEST)")
    p.add_argument("--coco-size", type=int, default=320,
                   help="input short side of the model-zoo-sized COCO pairs, px (default 320)")
    p.add_argument("--device", default=default_device(), help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default 0: leave torch's setting; "
                        "on busy machines 1 avoids oversubscription)")
    p.add_argument("--lr", type=float, default=0.0,
                   help="SGD learning rate of the measured steps (default 0: same work, models stay fixed)")
    p.add_argument("--dataset", default="shapes_val", help="built-in split the batch comes from (default shapes_val)")
    p.add_argument("--output", default="output/benchmarks/step_cost.json", help="JSON written here")
    cli.add_opts_argument(p, "extra config opts for every pair, e.g. -- DISTILL.TAR.PROPOSALS both")
    args = p.parse_args(argv)
    cli.check_opts(p, args)
    args.pairs = {x: pairs[x] for x in cli.check_choices(p, "--pairs", args.pairs, list(pairs))}
    for flag in ("iters", "memory_iters", "batch"):
        cli.check_positive(p, "--" + flag.replace("_", "-"), getattr(args, flag))
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    for opt in ("quickstart_size", "coco_size"):
        if getattr(args, opt) < 64 and not (opt == "quickstart_size" and getattr(args, opt) == 0):
            p.error(f"--{opt.replace('_', '-')} must be at least 64 px, got {getattr(args, opt)}")
    if args.threads < 0:
        p.error(f"--threads must be >= 0, got {args.threads}")
    if args.lr < 0:
        p.error(f"--lr must be >= 0, got {args.lr}")
    try:
        dev = torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device {args.device!r}: {e}")
    if dev.type not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    from d2_distill.data import SPLITS

    if args.dataset not in SPLITS:
        p.error(f"--dataset {args.dataset!r} is not a built-in split ({', '.join(SPLITS)})")
    return args


# ---------------------------------------------------------------------------
# building a pair
# ---------------------------------------------------------------------------
def pair_configs(config: str, device: str, opts=()):
    """(distiller cfg without teacher weights, teacher cfg) of a distilled config; builds nothing."""
    from d2_distill.engine import setup_cfg
    from d2_distill.modeling.teacher import load_teacher_cfg

    config = os.path.join(ROOT, config)
    cfg = setup_cfg(config, ["MODEL.DEVICE", device, *opts])
    return cfg, load_teacher_cfg(cfg)


def random_teacher_checkpoint(teacher_cfg, out_dir: str, batch=None) -> str:
    """The teacher built from its own config with random weights (FrozenBN
    statistics calibrated on ``batch``, see :func:`calibrate_frozen_bn`), saved with
    DetectionCheckpointer as ``out_dir/teacher_random.pth`` (what strict loading expects)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    tcfg = teacher_cfg.clone()
    tcfg.defrost()
    tcfg.MODEL.DEVICE = "cpu"
    tcfg.MODEL.WEIGHTS = ""
    model = build_model(tcfg)
    if batch is not None:
        calibrate_frozen_bn(model, batch)
    DetectionCheckpointer(model, save_dir=out_dir).save("teacher_random")
    del model
    return os.path.join(out_dir, "teacher_random.pth")


def calibrate_frozen_bn(model, batch) -> int:
    """Set every FrozenBatchNorm2d's statistics to those of its input on ``batch``
    (one forward of the backbone, layer by layer, like a BN forward in training
    mode); return how many layers were set.

    Random weights with FrozenBN's identity statistics (the model-zoo configs) let
    activations grow block after block, so a random R50/R101 RPN proposes mostly
    degenerate boxes and the ROI heads sample far fewer RoIs than a trained model:
    the measured workload would be unrepresentative. Normalised activations give
    a trained model's proposal and RoI counts. GroupNorm models are untouched."""
    from detectron2.layers import FrozenBatchNorm2d

    layers = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    if not layers:
        return 0

    def set_stats(module, inputs):
        x = inputs[0].float()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False).clamp(min=1e-4))

    handles = [m.register_forward_pre_hook(set_stats) for m in layers]
    try:
        with torch.no_grad():
            model.backbone(model.preprocess_image(batch).tensor)
    finally:
        for h in handles:
            h.remove()
    return len(layers)


def build_distiller(config: str, device: str, opts, tmp_dir: str, dataset: str, size: int, batch_size: int):
    """(cfg, Distiller with a random teacher and a random student, the batch,
    how many FrozenBN layers were calibrated in each model)."""
    from detectron2.layers import FrozenBatchNorm2d
    from detectron2.modeling import build_model

    from d2_distill.engine import setup_cfg
    from d2_distill.modeling import attach_teacher

    cfg, tcfg = pair_configs(config, device, opts)
    batch = make_batch(dataset, size, batch_size, cfg.INPUT.FORMAT)
    weights = random_teacher_checkpoint(tcfg, tmp_dir, batch)
    cfg = setup_cfg(os.path.join(ROOT, config), ["MODEL.DEVICE", device, *opts, "DISTILL.TEACHER.WEIGHTS", weights])
    model = attach_teacher(build_model(cfg), cfg)  # the Distiller with its teacher, on cfg.MODEL.DEVICE
    os.remove(weights)
    n_student = calibrate_frozen_bn(model.student, batch)
    n_teacher = sum(isinstance(m, FrozenBatchNorm2d) for m in model.teacher.modules())
    return cfg, model, batch, {"student": n_student, "teacher": n_teacher}


def make_batch(dataset: str, size: int, n: int, image_format: str) -> List[Dict]:
    """The first ``n`` images of ``dataset``, mapped by DatasetMapper (training mode)
    with the short side resized to ``size`` (the shapes images are square)."""
    import detectron2.data.transforms as T
    from detectron2.data import DatasetCatalog, DatasetMapper

    from d2_distill.data import ensure_datasets

    ensure_datasets([dataset])
    dicts = DatasetCatalog.get(dataset)
    if len(dicts) < n:
        raise ValueError(f"--batch {n}: {dataset} has only {len(dicts)} images")
    mapper = DatasetMapper(
        is_train=True,
        augmentations=[T.ResizeShortestEdge((size,), max_size=size, sample_style="choice"), T.RandomFlip()],
        image_format=image_format,
    )
    return [mapper(d) for d in dicts[:n]]


# ---------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------
class Synchronizer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def __call__(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def _malloc_trim() -> bool:
    """Give the C heap's free memory back to the OS (glibc), so that a phase's
    allocations show up as resident-set growth instead of reusing cached pages."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


class RSSSampler:
    """Peak resident-set growth during a phase (CPU runs): ``begin`` trims the heap,
    reads the baseline and starts a thread sampling /proc/self/statm every
    ``interval`` s; ``end`` stops it. No thread runs outside a memory phase."""

    def __init__(self, interval: float = RSS_SAMPLE_S):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.fd = os.open("/proc/self/statm", os.O_RDONLY)
        self.base = self.peak = 0
        self.thread: Optional[threading.Thread] = None
        self.stop_event = threading.Event()

    def rss(self) -> int:
        return int(os.pread(self.fd, 128, 0).split()[1]) * self.page

    def _run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def begin(self) -> None:
        _malloc_trim()
        self.base = self.peak = self.rss()
        self.stop_event.clear()
        self.thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.thread.start()

    def end(self) -> Dict[str, float]:
        self.stop_event.set()
        self.thread.join()
        peak = max(self.peak, self.rss())
        return {"peak_mb": peak / 2**20, "peak_growth_mb": (peak - self.base) / 2**20}

    def close(self) -> None:
        os.close(self.fd)


class CudaPeak:
    """Peak allocated CUDA memory during a phase (reset_peak_memory_stats per phase)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0

    def begin(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def end(self) -> Dict[str, float]:
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        return {"peak_mb": peak / 2**20, "peak_growth_mb": (peak - self.base) / 2**20}

    def close(self) -> None:
        pass


class CallTimer:
    """Wraps ``obj.name`` (an instance attribute shadows the method) and adds up the
    wall time of its calls, synchronizing CUDA around each."""

    def __init__(self, obj, name: str, sync: Synchronizer):
        self.obj, self.name, self.total, self.calls = obj, name, 0.0, 0
        original = getattr(obj, name)

        def wrapper(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                sync()
                self.total += time.perf_counter() - t0
                self.calls += 1

        obj.__dict__[name] = wrapper

    def reset(self) -> None:
        self.total, self.calls = 0.0, 0

    def remove(self) -> None:
        self.obj.__dict__.pop(self.name, None)


class TeacherCalls:
    """Forward hooks on every module of the teacher: how often each one is called
    (``counts``, by module name) and the wall time of the outermost teacher calls
    (``total``: a call inside another teacher call is not counted twice), with
    CUDA synchronised at each outermost start and end."""

    def __init__(self, teacher, sync: Synchronizer):
        self.sync = sync
        self.counts: Dict[str, int] = {}
        self.total, self.depth, self.t0 = 0.0, 0, 0.0
        self.handles = []
        for name, module in teacher.model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name or "<model>")))
            self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, name: str):
        def hook(_module, _inputs):
            self.counts[name] = self.counts.get(name, 0) + 1
            if self.depth == 0:
                self.sync()
                self.t0 = time.perf_counter()
            self.depth += 1
        return hook

    def _leave(self, _module, _inputs, _output):
        self.depth -= 1
        if self.depth == 0:
            self.sync()
            self.total += time.perf_counter() - self.t0

    def reset(self) -> None:
        self.counts, self.total = {}, 0.0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def recorded_step(model, batch):
    """A DistillStep of one training forward of ``model`` (a Distiller with its
    teacher) on ``batch``, as its method saw it (records included): the input of
    the h phase, ``model.method.teacher_heads(step)``."""
    seen = []
    method = model.method
    original = method.forward

    def keep(step):
        seen.append(step)
        return original(step)

    method.__dict__["forward"] = keep  # an instance attribute shadows the class method
    try:
        with torch.no_grad():
            model(batch)
    finally:
        method.__dict__.pop("forward", None)
    if not seen:
        raise RuntimeError(f"{type(model.method).__name__} did not run in a training step (it needs no teacher)")
    return seen[0]


def _num_params(params) -> int:
    return sum(p.numel() for p in params)


# what c - (a + b + h) is made of: (name, description)
BREAKDOWN = (
    ("teacher_backbone_extra", "teacher preprocess + backbone in c, minus b"),
    ("teacher_heads_extra", "teacher heads in c, minus h"),
    ("recording", "student forward in c (recording hooks on), minus a's forward"),
    ("method_losses", "the method's own forward work (targets, masks, losses), teacher heads excluded"),
    ("distiller", "the distiller's glue (GT to device, step assembly, schedule, diagnostics)"),
    ("backward_extra", "backward in c minus backward in a (distillation losses through student and adapters)"),
    ("optimizer_extra", "SGD step in c minus in a (the adapters' parameters)"),
)


def measure_pair(name: str, args, storage, memory) -> Dict:
    device = torch.device(args.device)
    config, kind = args.pairs[name]
    size = args.quickstart_size if kind == "quickstart" else args.coco_size
    if not size:  # the config's own test size
        size = pair_configs(config, args.device, list(args.opts or []))[0].INPUT.MIN_SIZE_TEST
    with tempfile.TemporaryDirectory(prefix="step_cost_") as tmp:
        cfg, model, batch, calibrated = build_distiller(
            config, args.device, list(args.opts or []), tmp, args.dataset, size, args.batch
        )
    model.train()
    student, teacher, method = model.student, model.teacher, model.method
    sync = Synchronizer(device)
    storage.iter = 0
    step = recorded_step(model, batch)  # h's input: the same batch, the student's records

    student_params = [p for p in student.parameters() if p.requires_grad]
    all_params = [p for p in model.parameters() if p.requires_grad]  # student + adapters; never the teacher
    opt_a = torch.optim.SGD(student_params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    opt_c = torch.optim.SGD(all_params, lr=args.lr, momentum=0.9, weight_decay=1e-4)

    timers = {
        "method_forward": CallTimer(method, "forward", sync),
        "method_before_student": CallTimer(method, "before_student", sync),
        "teacher_preprocess": CallTimer(teacher, "preprocess", sync),
        "teacher_backbone": CallTimer(teacher, "backbone", sync),
        "student_forward": CallTimer(student, "forward", sync),
    }
    calls = TeacherCalls(teacher, sync)
    split: Dict[str, float] = {}  # forward / backward / optimizer of the current a or c step

    def train_step(forward, opt):
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        losses = forward(batch)
        sync()
        t1 = time.perf_counter()
        sum(losses.values()).backward()
        sync()
        t2 = time.perf_counter()
        opt.step()
        sync()
        split.update(forward=t1 - t0, backward=t2 - t1, optimizer=time.perf_counter() - t2)

    def step_b():
        with torch.no_grad():
            teacher.backbone(teacher.preprocess(batch, model.input_format, model.size_divisibility))

    def step_h():
        with torch.no_grad():
            method.teacher_heads(step)

    steps = {"a": lambda: train_step(student, opt_a), "b": step_b, "h": step_h, "c": lambda: train_step(model, opt_c)}
    times: Dict[str, List[float]] = {k: [] for k in PHASES}
    mem: Dict[str, List[Dict[str, float]]] = {k: [] for k in PHASES}
    parts: Dict[str, List[float]] = {}  # per timed iteration: a's and c's parts

    def keep(key: str, value: float) -> None:
        parts.setdefault(key, []).append(value)

    def run_phase(k: str, mode: str) -> None:
        """mode: 'warmup' (nothing kept), 'time' (wall time) or 'memory' (peak memory)."""
        for t in timers.values():
            t.reset()
        calls.reset()
        gc.collect()
        if mode == "memory":
            memory.begin()
        sync()
        t0 = time.perf_counter()
        steps[k]()
        sync()
        dt = time.perf_counter() - t0
        if mode == "memory":
            mem[k].append(memory.end())
        opt_a.zero_grad(set_to_none=True)
        opt_c.zero_grad(set_to_none=True)
        if mode != "time":
            return
        times[k].append(dt)
        tm = {x: t.total for x, t in timers.items()}
        if k == "a":
            for x in ("forward", "backward", "optimizer"):
                keep(f"a_{x}", split[x])
        if k == "c":
            for x in ("forward", "backward", "optimizer"):
                keep(f"c_{x}", split[x])
            t_backbone = tm["teacher_preprocess"] + tm["teacher_backbone"]
            # teacher module time outside the backbone = the heads (preprocess is no module call)
            t_heads = calls.total - tm["teacher_backbone"]
            keep("c_teacher_backbone", t_backbone)
            keep("c_teacher_heads", t_heads)
            keep("c_student_forward", tm["student_forward"])
            keep("c_method", tm["method_forward"] + tm["method_before_student"] - t_heads)
            keep("c_distiller", split["forward"] - t_backbone - tm["student_forward"]
                 - tm["method_forward"] - tm["method_before_student"])
            keep("method_forward_in_c", tm["method_forward"])

    rounds = ["warmup"] * args.warmup + ["time"] * args.iters + ["memory"] * args.memory_iters
    try:
        # priming, not measured: both optimizers create their momentum buffers
        run_phase("c", "warmup")
        run_phase("a", "warmup")
        for i, mode in enumerate(rounds):
            storage.iter = i + 1
            for k in PHASES:
                run_phase(k, mode)
    finally:
        for t in timers.values():
            t.remove()
        calls.remove()

    med = {k: statistics.median(v) for k, v in times.items()}
    pm = {k: statistics.median(v) for k, v in parts.items()}
    floor = med["a"] + med["b"] + med["h"]
    breakdown = {
        "teacher_backbone_extra": pm["c_teacher_backbone"] - med["b"],
        "teacher_heads_extra": pm["c_teacher_heads"] - med["h"],
        "recording": pm["c_student_forward"] - pm["a_forward"],
        "method_losses": pm["c_method"],
        "distiller": pm["c_distiller"],
        "backward_extra": pm["c_backward"] - pm["a_backward"],
        "optimizer_extra": pm["c_optimizer"] - pm["a_optimizer"],
    }
    peak = {k: max(x["peak_growth_mb"] for x in v) for k, v in mem.items()}
    result = {
        "config": config,
        "teacher_config": cfg.DISTILL.TEACHER.CONFIG_FILE,
        "method": cfg.DISTILL.METHOD,
        "input_size": size,
        "batch": args.batch,
        "student_params": _num_params(student.parameters()),
        "adapter_params": _num_params(method.parameters()),
        "teacher_params": _num_params(teacher.parameters()),
        "frozen_bn_layers_calibrated": calibrated,
        "a_student_step_s": med["a"],
        "b_teacher_forward_s": med["b"],
        "h_teacher_heads_s": med["h"],
        "c_distill_step_s": med["c"],
        "ratio_c_over_a_plus_b": med["c"] / (med["a"] + med["b"]),
        "ratio_c_over_floor": med["c"] / floor,
        "excess_s": med["c"] - floor,
        "breakdown_s": breakdown,
        "parts_s": pm,
        "method_forward_in_c_s": pm["method_forward_in_c"],
        "method_share_of_c": sum(parts["method_forward_in_c"]) / sum(times["c"]),
        "teacher_backbone_in_c_s": pm["c_teacher_backbone"],
        "times_s": times,
        "memory_ratio_c_over_floor": peak["c"] / max(peak["a"] + peak["b"] + peak["h"], 1e-9),
        "memory": {
            k: {
                "peak_mb": max(x["peak_mb"] for x in v),
                "peak_growth_mb": peak[k],
                "per_iter": v,
            }
            for k, v in mem.items()
        },
    }
    return result


def run(args) -> Dict:
    from detectron2.utils.events import EventStorage

    import d2_distill  # noqa: F401  (registers the Distiller, the methods and the datasets)

    device = torch.device(args.device)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        memory = CudaPeak(device)
        memory_kind = "cuda: torch.cuda.max_memory_allocated per phase (reset_peak_memory_stats before each)"
        device_name = torch.cuda.get_device_name(device)
    else:
        memory = RSSSampler()
        memory_kind = (
            f"cpu: peak RSS growth during the phase over the RSS at its start, /proc/self/statm sampled every "
            f"{RSS_SAMPLE_S * 1000:.0f} ms by a background thread; glibc malloc_trim(0) before each memory phase "
            "so that freed heap pages are not silently reused (a sampled lower bound of the true peak)"
        )
        device_name = "cpu"
    summary = {
        "device": str(device),
        "device_name": device_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "memory_measure": memory_kind,
        "settings": {
            "iters": args.iters, "warmup": args.warmup, "memory_iters": args.memory_iters,
            "batch": args.batch, "lr": args.lr,
            "quickstart_size": args.quickstart_size, "coco_size": args.coco_size,
            "dataset": args.dataset, "opts": list(args.opts or []),
        },
        "phases": PHASE_NAMES,
        "pairs": {},
    }
    try:
        with EventStorage(0) as storage:
            for name in args.pairs:
                summary["pairs"][name] = measure_pair(name, args, storage, memory)
                gc.collect()  # the pair's models are gone with measure_pair's frame
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        memory.close()
        torch.set_num_threads(threads_before)
    return summary


def markdown(summary: Dict) -> str:
    lines = [
        f"device: {summary['device']} ({summary['device_name']}), torch {summary['torch']}, "
        f"{summary['threads']} threads; medians of {summary['settings']['iters']} interleaved iterations, "
        f"batch {summary['settings']['batch']}",
        f"memory: {summary['memory_measure']}",
        "",
        "| pair | input | a: student step s | b: teacher fwd s | h: teacher heads s | c: distill step s "
        "| c/(a+b) | c/(a+b+h) | peak growth a / b / h / c MB | c/(a+b+h) memory |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in summary["pairs"].items():
        growth = " / ".join(f"{r['memory'][k]['peak_growth_mb']:.0f}" for k in PHASES)
        lines.append(
            f"| {name} | {r['input_size']} | {r['a_student_step_s']:.4f} | {r['b_teacher_forward_s']:.4f} "
            f"| {r['h_teacher_heads_s']:.4f} | {r['c_distill_step_s']:.4f} | {r['ratio_c_over_a_plus_b']:.2f} "
            f"| {r['ratio_c_over_floor']:.3f} "
            f"| {growth} "
            f"| {r['memory_ratio_c_over_floor']:.2f} |"
        )
    lines += [
        "",
        "Where c - (a+b+h) goes, s per step (medians of each part, so the parts add up to the excess only roughly):",
        "",
        "| pair | c - (a+b+h) | " + " | ".join(k for k, _ in BREAKDOWN) + " |",
        "|---|---|" + "---|" * len(BREAKDOWN),
    ]
    for name, r in summary["pairs"].items():
        lines.append(f"| {name} | {r['excess_s']:+.4f} | "
                     + " | ".join(f"{r['breakdown_s'][k]:+.4f}" for k, _ in BREAKDOWN) + " |")
    lines += ["", "c/(a+b+h): 1.00 = a distillation step costs no more than a student step, the teacher's",
              "backbone and the teacher heads the method declares (method.teacher_heads)."]
    lines += [f"{k}: {d}" for k, d in BREAKDOWN]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    summary = run(args)
    stats.report(args.output, summary, markdown(summary))
    return summary


if __name__ == "__main__":
    main()
