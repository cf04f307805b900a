"""The quickstart demo: distil a small detector from a bigger one on the built-in dataset.

    python -m benchmarks.demo                  # TAR: Faster R-CNN teacher -> smaller Faster R-CNN
    python -m benchmarks.demo --method tbd     # TBD: RetinaNet teacher -> smaller RetinaNet
    python -m benchmarks.demo --method pkd --config pkd_retinanet

``--method`` is any registered method with a quickstart config (see
``benchmarks.setups``); a method with configs for several architectures takes
``--config`` (default: the first). Steps: train the teacher (or reuse its
checkpoint), train the plain student and the distilled student on the same
schedule and seed, evaluate all three with COCOEvaluator, print a table (AP,
AP50, AP75, harmony, parameters, GFLOPs, inference ms/image) and save two
figures: AP bars with the students' detection-loss curves, and the three models'
detections on the same validation images. Runs are cached in ``--output``:
a finished run is reused, not retrained.

The demo's regime is fixed so that a first run fits 30 min on 2 cores and a rerun
on the same CPU type prints the same numbers: students of ``--iters`` 700 (under half
the configs' schedules; the tables in RESULTS.md use each config's own), the
teachers at 2400 iterations (``--teacher-iters``; 3200 and 3600 in the
tables), the teacher trained with ``--threads`` 2 torch threads, the two students
side by side (``--jobs`` 2) with half of them each. bfloat16 results depend on the thread
count, which is why it is pinned rather than taken from the machine.

``--precision auto`` (the default) trains in bfloat16 autocast
(``SOLVER.AMP.ENABLED``, :mod:`d2_distill.engine.amp`) on a CPU with native
bfloat16 arithmetic (AVX512-BF16 or AMX), in float32 elsewhere. bfloat16 runs
are cached apart from the float32 ones of the lab's tables: the teacher in its
quickstart folder plus ``_bf16``, the students under ``output/runs_bf16``.
"""
import argparse
import os
import time

from . import cli, parallel, setups as lab, stats
from .runs import console_and_log

DEMO_ITERS = 700  # student iterations: a first run within 30 min, a teacher-cached one within 10, on 2 cores
DEMO_THREADS = 2  # torch threads, pinned: bfloat16 results depend on the thread count
# teachers trained shorter than their config for the demo (file name -> iterations):
# a teacher's own schedule alone takes 23 min on 2 cores (3200 / 3600 iterations)
DEMO_TEACHER_ITERS = {"faster_rcnn_R34_FPN_teacher.yaml": 2400, "retinanet_R34_FPN_teacher.yaml": 2400}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    found = lab.discover_setups()
    p.add_argument("--method", type=str.lower, choices=sorted(found), default="tar",
                   help="a registered method with a quickstart config (default tar; any case)")
    p.add_argument("--config", default="",
                   help="which of the method's quickstart configs (file stem or path; default: the first)")
    p.add_argument("--iters", type=int, default=DEMO_ITERS,
                   help=f"student schedule (SOLVER.MAX_ITER; default {DEMO_ITERS}, the demo's: the configs' own "
                        "schedules are longer)")
    p.add_argument("--threads", type=int, default=DEMO_THREADS,
                   help=f"torch threads of the teacher's training; each of the --jobs students side by side gets "
                        f"threads/jobs (default {DEMO_THREADS}: pinned, since bfloat16 results depend on it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-iters", type=int, default=None,
                   help="the teacher's schedule when the demo trains it (default: the demo's, "
                        f"{DEMO_TEACHER_ITERS} or else the teacher config's own; 0: the config's own)")
    p.add_argument("--output", default="",
                   help="run cache and figure folder (default output/runs; output/runs_bf16 in bfloat16)")
    p.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="training arithmetic on CPU (default auto: bfloat16 autocast where the CPU has native "
                        "bfloat16, else float32)")
    p.add_argument("--timing-images", type=int, default=20, help="validation images for inference ms/image")
    p.add_argument("--show-images", type=int, default=3,
                   help="validation images in the detections picture (teacher / plain / distilled; default 3)")
    p.add_argument("--show-score", type=float, default=0.3,
                   help="score threshold of the drawn detections (0.3: the small students are under-confident)")
    p.add_argument("--teacher-weights", default="",
                   help="use this teacher checkpoint instead of training (or reusing) the quickstart teacher")
    p.add_argument("--verbose", action="store_true",
                   help="show detectron2's whole log on the console (default: stages, progress with ETAs, "
                        "results and warnings; the whole log is always in <output>/demo_<setup>.log)")
    cli.add_jobs_argument(p)
    p.set_defaults(jobs=2)
    cli.add_opts_argument(p, "extra config opts for the student runs and the teacher's evaluation")
    args = p.parse_args(argv)
    cli.check_opts(p, args)
    cli.check_file(p, "--teacher-weights", args.teacher_weights)
    cli.check_positive(p, "--timing-images", args.timing_images)
    cli.check_positive(p, "--show-images", args.show_images)
    cli.check_positive(p, "--iters", args.iters)
    cli.check_positive(p, "--jobs", args.jobs)
    cli.check_positive(p, "--threads", args.threads)
    try:
        args.setup = lab.find_setup(found, args.method, args.config)
    except KeyError as e:
        p.error(f"--config: {e.args[0]}")
    if args.teacher_iters is None:
        args.teacher_iters = default_teacher_iters(args.setup)
    if args.teacher_iters < 0:
        p.error(f"--teacher-iters must be >= 0, got {args.teacher_iters}")
    args.precision = resolve_precision(args.precision)
    if not args.output:
        args.output = "output/runs_bf16" if args.precision == "bfloat16" else "output/runs"
    return args


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bfloat16`` on a CPU-only machine with native bfloat16, else ``float32``."""
    if precision != "auto":
        return precision
    import torch

    from d2_distill.engine.amp import cpu_has_native_bf16

    return "bfloat16" if not torch.cuda.is_available() and cpu_has_native_bf16() else "float32"


def default_teacher_iters(setup) -> int:
    """The demo's teacher schedule: :data:`DEMO_TEACHER_ITERS` for its config, else 0 (the config's own)."""
    return DEMO_TEACHER_ITERS.get(os.path.basename(setup.teacher_config), 0)


def teacher_opts(setup, precision: str, iters: int = 0) -> list:
    """The quickstart teacher's opts: none in float32 at its own schedule; in
    bfloat16 autocast, and with ``iters`` (> 0) that schedule, its lr drops at the
    same fractions as the config's; either way a folder of its own beside the
    teacher of the lab's tables (``_bf16``, ``_<iters>it``)."""
    from d2_distill.engine import setup_cfg

    own = setup_cfg(setup.teacher_config, [])
    opts, suffix = [], ""
    if iters and iters != own.SOLVER.MAX_ITER:
        steps = sorted({int(x * iters / own.SOLVER.MAX_ITER) for x in own.SOLVER.STEPS} - {0})
        opts += ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", str(tuple(steps))]
        suffix += f"_{iters}it"
    if precision == "bfloat16":
        opts += ["SOLVER.AMP.ENABLED", "True"]
        suffix += "_bf16"
    return opts + ["OUTPUT_DIR", own.OUTPUT_DIR.rstrip("/") + suffix] if suffix else []


def measure(config_file: str, opts, weights: str, num_images: int, show: int = 0, detections=None) -> dict:
    """Parameters, GFLOPs (fvcore, one test-size image) and eval-mode ms/image on CPU,
    of what is deployed: the student alone for a distiller config. Images are
    prepared as detectron2's DefaultPredictor does (``d2_distill.student.student_inputs``).
    The predictions on the first ``show`` images are appended to ``detections``
    (file name, boxes, scores, classes), for the detections picture."""
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image
    from detectron2.modeling import build_model
    from detectron2.utils.analysis import FlopCountAnalysis

    from d2_distill.engine import setup_cfg
    from d2_distill.student import is_distiller_state, student_cfg, student_inputs, student_state_dict

    cfg = student_cfg(setup_cfg(config_file, list(opts)))
    model = build_model(cfg)
    state = torch.load(weights, map_location="cpu", weights_only=True)["model"]
    if is_distiller_state(state):
        model.load_state_dict(student_state_dict(state))
    else:
        DetectionCheckpointer(model).load(weights)
    model.eval()
    dicts = DatasetCatalog.get(cfg.DATASETS.TEST[0])[:max(num_images, show)]
    inputs = [student_inputs(cfg, read_image(d["file_name"], "BGR")) for d in dicts]
    with torch.no_grad():
        flops = FlopCountAnalysis(model, [inputs[0]])
        flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        gflops = flops.total() / 1e9
        model([inputs[0]])  # warm-up
        start = time.perf_counter()
        for x in inputs[:num_images]:
            model([x])
        ms = 1000 * (time.perf_counter() - start) / num_images
        for d, x in zip(dicts[:show], inputs):
            inst = model([x])[0]["instances"].to("cpu")
            detections.append({"dataset": cfg.DATASETS.TEST[0], "file_name": d["file_name"], "boxes": inst.pred_boxes.tensor.numpy(),
                               "scores": inst.scores.numpy(), "classes": inst.pred_classes.numpy()})
    return {"params_M": sum(p.numel() for p in model.parameters()) / 1e6, "GFLOPs": gflops, "ms_per_image": ms}


def detection_loss(history: dict, exclude=()) -> list:
    """Per-iteration sum of the student's own losses: every logged ``loss_*`` except
    the names in ``exclude`` (the method's declared ``loss_names``)."""
    own = [k for k in history if k.startswith("loss_") and k not in set(exclude)]
    by_iter = {}
    for k in own:
        for it, v in history[k]:
            by_iter[it] = by_iter.get(it, 0.0) + v
    return sorted(by_iter.items())


def figure(rows, histories, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["model"] for r in rows]
    x = np.arange(len(names))
    for i, key in enumerate(("AP", "AP50")):
        bars = ax1.bar(x + (i - 0.5) * 0.38, [r[key] for r in rows], 0.38, label=key)
        ax1.bar_label(bars, fmt="%.1f", fontsize=8)
    ax1.set_xticks(x, names)
    ax1.set_ylabel("COCO box AP (validation split)")
    ax1.legend()
    ax1.set_title(title)
    for name, hist in histories.items():
        its, vals = zip(*hist)
        k = max(1, len(vals) // 30)
        smooth = np.convolve(vals, np.ones(k) / k, mode="valid")
        ax2.plot(its[k - 1:], smooth, label=name)
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("detection loss (distillation terms excluded)")
    ax2.legend()
    ax2.set_title("training loss of the two students")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def drawn(det: dict, min_score: float, iou: float = 0.5):
    """Indices of the detections the picture shows: score >= ``min_score``, then
    class-agnostic NMS at ``iou`` (highest score first), so that one object shows
    the model's best guess instead of every class it considered."""
    import numpy as np
    import torch
    from torchvision.ops import nms

    idx = np.flatnonzero(det["scores"] >= min_score)
    if idx.size == 0:
        return idx
    keep = nms(torch.as_tensor(det["boxes"][idx]).float(), torch.as_tensor(det["scores"][idx]).float(), iou)
    return idx[keep.numpy()]


def detections_figure(models, path: str, min_score: float) -> None:
    """One row per validation image: the ground truth, then one column per model with
    its detections (score >= ``min_score``, class-agnostic NMS: :func:`drawn`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.detection_utils import read_image

    dataset = next(iter(models.values()))[0]["dataset"]
    names = MetadataCatalog.get(dataset).thing_classes
    truth = {d["file_name"]: d for d in DatasetCatalog.get(dataset)}
    colours = plt.get_cmap("tab10")
    rows = len(next(iter(models.values())))
    columns = ["ground truth"] + list(models)
    fig, axes = plt.subplots(rows, len(columns), figsize=(3.2 * len(columns), 3.2 * rows), squeeze=False)

    def box(ax, xyxy, c, label):
        x0, y0, x1, y1 = xyxy
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.5, color=colours(c % 10)))
        ax.text(x0 + 1, y0 + 1, label, fontsize=6, color="white", va="top",
                bbox={"facecolor": colours(c % 10), "pad": 0.5, "lw": 0})

    for row in range(rows):
        file_name = next(iter(models.values()))[row]["file_name"]
        for col, name in enumerate(columns):
            ax = axes[row][col]
            ax.imshow(read_image(file_name, "RGB"))
            ax.set_xticks([]), ax.set_yticks([])
            if name == "ground truth":
                annos = truth[file_name]["annotations"]
                for a in annos:  # COCO-style XYWH_ABS
                    x, y, w, h = a["bbox"]
                    box(ax, (x, y, x + w, y + h), a["category_id"], names[a["category_id"]])
                ax.set_xlabel(f"{len(annos)} objects", fontsize=7)
            else:
                det = models[name][row]
                keep = drawn(det, min_score)
                for i in keep:
                    box(ax, det["boxes"][i], det["classes"][i], f"{names[det['classes'][i]]} {det['scores'][i]:.2f}")
                ax.set_xlabel(f"{len(keep)} detections (score ≥ {min_score}, one per place)", fontsize=7)
            if row == 0:
                ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(table, cols) -> str:
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in table:
        lines.append(f"| {r['model']} | " + " | ".join(
            stats.fmt(r.get(c, float("nan")), digits=3 if c == "harmonious_ratio" else 2) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    log_path = os.path.join(args.output, f"demo_{args.setup.key}.log")
    with console_and_log(log_path, args.verbose) as say:
        if not args.verbose:
            say(f"[demo] detectron2's whole log: {log_path} (--verbose shows it here)")
        return run(args, say)


def run(args, say):
    """The demo with this process's torch threads pinned to ``--threads`` meanwhile."""
    import torch

    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, say)
    finally:
        torch.set_num_threads(threads_before)


def _run(args, say):
    setup, iters, extra = args.setup, args.iters, list(args.opts)
    if args.precision == "bfloat16":
        extra = ["SOLVER.AMP.ENABLED", "True", *extra]
    name = setup.method
    start = time.perf_counter()
    schedule = f"{args.teacher_iters} iterations, " if args.teacher_iters else ""
    say(f"[demo] 1/4 teacher ({setup.teacher_config}, {schedule}{args.precision}, {args.threads} threads)")
    teacher = lab.ensure_teacher(setup, args.teacher_weights, teacher_opts(setup, args.precision, args.teacher_iters))
    plain_row, full_row = lab.plain_row(setup), lab.full_row(setup)
    if args.jobs > 1:
        say(f"[demo] 2-3/4 plain and {name} students side by side ({iters} iterations, --jobs {args.jobs})")
        parallel.train_parallel([(row, args.output, iters, args.seed, teacher, extra) for row in (plain_row, full_row)],
                                args.jobs, quiet=not args.verbose, threads=max(1, args.threads // args.jobs))
    say(f"[demo] 2/4 plain student ({setup.plain_config}, {iters} iterations)")
    plain = lab.train_row(plain_row, args.output, iters, args.seed, teacher, extra)
    say(f"[demo]     plain student: {plain['metrics']['AP']:.2f} AP ({plain['run']})")
    say(f"[demo] 3/4 {name} student ({setup.config}, {iters} iterations)")
    distilled = lab.train_row(full_row, args.output, iters, args.seed, teacher, extra)
    say(f"[demo]     {name} student: {distilled['metrics']['AP']:.2f} AP ({distilled['run']})")

    say("[demo] 4/4 evaluation and measurements")
    n, show = args.timing_images, args.show_images
    dets = {"teacher": [], "plain student": [], f"{name} student": []}
    table = [
        {"model": "teacher", **lab.evaluate_teacher(setup, teacher, extra),
         **measure(setup.teacher_config, extra, teacher, n, show, dets["teacher"])},
        {"model": "plain student", **plain["metrics"],
         **measure(plain_row.config, plain["opts"], os.path.join(plain["run"], "model_final.pth"), n, show,
                   dets["plain student"])},
        {"model": f"{name} student", **distilled["metrics"],
         **measure(full_row.config, distilled["opts"], os.path.join(distilled["run"], "model_final.pth"), n, show,
                   dets[f"{name} student"])},
    ]
    cols = ["AP", "AP50", "AP75", "harmonious_ratio", "params_M", "GFLOPs", "ms_per_image"]
    text = markdown(table, cols)
    os.makedirs(args.output, exist_ok=True)
    stem = f"demo_{setup.key}"
    fig_path = os.path.join(args.output, f"{stem}.png")
    exclude = setup.method_cls.loss_names
    figure(table, {"plain student": detection_loss(plain["loss_history"], exclude),
                   f"{name} student": detection_loss(distilled["loss_history"], exclude)},
           fig_path, f"{name} on the built-in dataset, {iters} iterations")
    det_path = os.path.join(args.output, f"{stem}_detections.png")
    detections_figure({f"{m} ({r['AP']:.1f} AP)": d for (m, d), r in zip(dets.items(), table)},
                      det_path, args.show_score)
    stats.write_json(os.path.join(args.output, f"{stem}.json"),
                   {"config": setup.config, "rows": table, "iters": iters, "seed": args.seed,
                    "precision": args.precision})
    say("\n" + text)
    gain = table[2]["AP"] - table[1]["AP"]
    say(f"\n{name} student vs plain student: {gain:+.2f} AP ({args.precision}); figures: {fig_path}, {det_path}; "
          f"wall time {time.perf_counter() - start:.0f} s")
    return {"rows": table, "figure": fig_path, "detections": det_path, "markdown": text, "setup": setup}


if __name__ == "__main__":
    main()
