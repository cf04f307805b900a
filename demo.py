#!/usr/bin/env python
"""The quickstart demo: distil a small detector from a bigger one on the built-in dataset.

    python demo.py                 # TAR: Faster R-CNN R34-FPN(128) teacher -> R18-FPN(64) student
    python demo.py --method tbd    # TBD: RetinaNet R34-FPN(128) teacher -> R18-FPN(64) student

Steps: train the teacher (or reuse its checkpoint), train the plain student and
the distilled student on the same schedule and seed, evaluate all three with
COCOEvaluator, print a table (AP, AP50, AP75, parameters, GFLOPs, inference
ms/image) and save a figure (AP bars, the students' detection-loss curves).
Runs are cached in ``--output``: a finished run is reused, not retrained.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

from benchmarks.ablation import SETUPS, check_iters, default_iters, run_folder, schedule_opts  # noqa: E402
from d2_distill.engine.runs import ensure_trained, evaluate, setup_logging, train_and_evaluate  # noqa: E402

DISTILLED_ROW = {"tar": "full TAR", "tbd": "full TBD"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=sorted(SETUPS), default="tar", help="tar (default) or tbd")
    p.add_argument("--iters", type=int, default=None,
                   help="student schedule (SOLVER.MAX_ITER); default: the student config's own (400)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="output/runs", help="run cache and figure folder")
    p.add_argument("--timing-images", type=int, default=20, help="validation images for inference ms/image")
    p.add_argument("--teacher-weights", default="",
                   help="use this teacher checkpoint instead of training (or reusing) the quickstart teacher")
    p.add_argument("opts", nargs=argparse.REMAINDER,
                   help="extra config opts (KEY VALUE ...) for the student runs and the teacher's evaluation")
    args = p.parse_args(argv)
    if args.opts and args.opts[0] == "--":
        args.opts = args.opts[1:]
    if len(args.opts) % 2:
        p.error(f"opts must be KEY VALUE pairs, got {args.opts}")
    if args.teacher_weights and "://" not in args.teacher_weights and not os.path.isfile(args.teacher_weights):
        p.error(f"--teacher-weights: no such file {args.teacher_weights!r}")
    if args.timing_images <= 0:
        p.error(f"--timing-images must be positive, got {args.timing_images}")
    check_iters(p, args.iters)
    if args.iters is None:
        args.iters = default_iters(args.method)
    return args


def measure(config_file: str, opts, weights: str, num_images: int) -> dict:
    """Parameters, GFLOPs (fvcore, one test-size image) and eval-mode ms/image on CPU.

    Images are resized like detectron2's DefaultPredictor and the evaluator's
    test mapper do (ResizeShortestEdge to INPUT.MIN/MAX_SIZE_TEST)."""
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import DatasetCatalog
    from detectron2.data import transforms as T
    from detectron2.data.detection_utils import read_image
    from detectron2.modeling import build_model
    from detectron2.utils.analysis import FlopCountAnalysis

    from d2_distill.engine import setup_cfg
    from d2_distill.modeling import student_cfg

    cfg = setup_cfg(config_file, list(opts))
    if cfg.MODEL.META_ARCHITECTURE == "Distiller":
        cfg = student_cfg(cfg)  # what users deploy: the student alone
    model = build_model(cfg)
    state = torch.load(weights, map_location="cpu", weights_only=True)["model"]
    if any(k.startswith("student.") for k in state):
        state = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
        model.load_state_dict(state)
    else:
        DetectionCheckpointer(model).load(weights)
    model.eval()
    dicts = DatasetCatalog.get(cfg.DATASETS.TEST[0])[:num_images]
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    images = [read_image(d["file_name"], cfg.INPUT.FORMAT) for d in dicts]
    inputs = [
        {"image": torch.as_tensor(resize.get_transform(im).apply_image(im).transpose(2, 0, 1).copy()),
         "height": d["height"], "width": d["width"]}
        for im, d in zip(images, dicts)
    ]
    with torch.no_grad():
        flops = FlopCountAnalysis(model, [inputs[0]])
        flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        gflops = flops.total() / 1e9
        model([inputs[0]])  # warm-up
        start = time.perf_counter()
        for x in inputs:
            model([x])
        ms = 1000 * (time.perf_counter() - start) / len(inputs)
    return {"params_M": sum(p.numel() for p in model.parameters()) / 1e6, "GFLOPs": gflops, "ms_per_image": ms}


def detection_loss(history: dict) -> list:
    """Per-iteration sum of the student's own losses (distillation terms excluded)."""
    own = [k for k in history if k.startswith("loss_") and not k.startswith(("loss_tar", "loss_tbd", "loss_feat"))]
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
    for i, (key, label) in enumerate((("AP", "AP"), ("AP50", "AP50"))):
        bars = ax1.bar(x + (i - 0.5) * 0.38, [r[key] for r in rows], 0.38, label=label)
        ax1.bar_label(bars, fmt="%.1f", fontsize=8)
    ax1.set_xticks(x, names)
    ax1.set_ylabel("COCO box AP (shapes_val)")
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


def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    rows_def, teacher_cfg, _ = SETUPS[args.method]
    start = time.perf_counter()
    print(f"[demo] 1/4 teacher ({teacher_cfg})", flush=True)
    teacher = args.teacher_weights or ensure_trained(teacher_cfg)
    common = schedule_opts(args.iters, args.seed) + list(args.opts)
    harmony = ["DISTILL.EVAL.HARMONY", "True"] if args.method == "tbd" else []
    teacher_opts = list(args.opts) + harmony
    plain_name, plain_cfg, plain_opts = rows_def[0]
    dist_name, dist_cfg, dist_opts = next(r for r in rows_def if r[0] == DISTILLED_ROW[args.method])
    print(f"[demo] 2/4 plain student ({plain_cfg}, {args.iters} iterations)", flush=True)
    plain = train_and_evaluate(plain_cfg, common + plain_opts, run_folder(args, plain_name))
    print(f"[demo] 3/4 distilled student ({dist_cfg}, {args.iters} iterations)", flush=True)
    dist_opts = common + dist_opts + ["DISTILL.TEACHER.WEIGHTS", teacher]
    distilled = train_and_evaluate(dist_cfg, dist_opts, run_folder(args, dist_name))

    print("[demo] 4/4 evaluation and measurements", flush=True)
    table = [
        {"model": "teacher", **evaluate(teacher_cfg, teacher_opts, teacher),
         **measure(teacher_cfg, teacher_opts, teacher, args.timing_images)},
        {"model": "plain student", **plain["metrics"],
         **measure(plain_cfg, plain["opts"], os.path.join(run_folder(args, plain_name), "model_final.pth"), args.timing_images)},
        {"model": f"{args.method.upper()} student", **distilled["metrics"],
         **measure(dist_cfg, distilled["opts"], os.path.join(run_folder(args, dist_name), "model_final.pth"), args.timing_images)},
    ]
    cols = ["AP", "AP50", "AP75"] + (["harmonious_ratio"] if args.method == "tbd" else []) + ["params_M", "GFLOPs", "ms_per_image"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in table:
        lines.append(f"| {r['model']} | " + " | ".join(f"{r.get(c, float('nan')):.{3 if c == 'harmonious_ratio' else 2}f}" for c in cols) + " |")
    os.makedirs(args.output, exist_ok=True)
    fig_path = os.path.join(args.output, f"demo_{args.method}.png")
    figure(table, {"plain student": detection_loss(plain["loss_history"]),
                   f"{args.method.upper()} student": detection_loss(distilled["loss_history"])},
           fig_path, f"{args.method.upper()} on the built-in dataset, {args.iters} iterations")
    with open(os.path.join(args.output, f"demo_{args.method}.json"), "w") as f:
        json.dump({"rows": table, "iters": args.iters, "seed": args.seed}, f, indent=1)
    print("\n" + "\n".join(lines))
    gain = table[2]["AP"] - table[1]["AP"]
    print(f"\n{args.method.upper()} student vs plain student: {gain:+.2f} AP; figure: {fig_path}; "
          f"wall time {time.perf_counter() - start:.0f} s")
    return {"rows": table, "figure": fig_path, "markdown": "\n".join(lines)}


if __name__ == "__main__":
    main()
