#!/usr/bin/env python
"""Ablation of TAR or TBD on the built-in dataset, at one fixed short schedule.

    python benchmarks/ablation.py --method tar      # Faster R-CNN R34-FPN(128) -> R18-FPN(64)
    python benchmarks/ablation.py --method tbd      # RetinaNet   R34-FPN(128) -> R18-FPN(64)

Trains the teacher first if its checkpoint is missing, then every row with the
same seed and schedule, evaluates each with COCOEvaluator (and the harmony
evaluator), and prints a markdown table; writes ``<output>/<method>.json``.
Finished rows are reused (each run folder keeps a results.json).
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from d2_distill.engine.runs import ensure_trained, evaluate, setup_logging, train_and_evaluate  # noqa: E402

QS = "configs/quickstart"
TAR_ROWS = [
    ("plain student", f"{QS}/faster_rcnn_R18_FPN_student.yaml", []),
    ("+ feature", f"{QS}/tar_faster_rcnn.yaml", ["DISTILL.TAR.CLS_WEIGHT", "0.0", "DISTILL.TAR.REG_WEIGHT", "0.0"]),
    ("+ classification", f"{QS}/tar_faster_rcnn.yaml", ["DISTILL.TAR.FEAT_WEIGHT", "0.0", "DISTILL.TAR.REG_WEIGHT", "0.0"]),
    ("+ regression", f"{QS}/tar_faster_rcnn.yaml", ["DISTILL.TAR.FEAT_WEIGHT", "0.0", "DISTILL.TAR.CLS_WEIGHT", "0.0"]),
    ("full TAR", f"{QS}/tar_faster_rcnn.yaml", []),
    ("full TAR, no decay", f"{QS}/tar_faster_rcnn.yaml", ["DISTILL.SCHEDULE.KIND", "constant"]),
]
TBD_ROWS = [
    ("plain student", f"{QS}/retinanet_R18_FPN_student.yaml", ["DISTILL.EVAL.HARMONY", "True"]),
    ("+ HD", f"{QS}/tbd_retinanet.yaml", ["DISTILL.TBD.TFD_WEIGHT", "0.0"]),
    ("+ TFD", f"{QS}/tbd_retinanet.yaml", ["DISTILL.TBD.HD_WEIGHT", "0.0"]),
    ("full TBD", f"{QS}/tbd_retinanet.yaml", []),
]
SETUPS = {
    "tar": (TAR_ROWS, f"{QS}/faster_rcnn_R34_FPN_teacher.yaml", "AP AP50".split()),
    "tbd": (TBD_ROWS, f"{QS}/retinanet_R34_FPN_teacher.yaml", "AP AP50 harmonious_ratio".split()),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=sorted(SETUPS), required=True)
    p.add_argument("--iters", type=int, default=None,
                   help="student schedule (SOLVER.MAX_ITER); default: the student config's own")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="output/runs", help="folder for runs (shared with demo.py) and the JSON summary")
    p.add_argument("--rows", nargs="*", help="only these row names (default: all)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="extra config opts for every student run")
    args = p.parse_args(argv)
    check_iters(p, args.iters)
    if args.iters is None:
        args.iters = default_iters(args.method)
    return args


def check_iters(p: argparse.ArgumentParser, iters) -> None:
    if iters is not None and iters <= 0:
        p.error(f"--iters must be positive, got {iters}")


def default_iters(method: str) -> int:
    """The plain student config's SOLVER.MAX_ITER: the schedule the quickstart is sized for."""
    from d2_distill.engine import setup_cfg

    return setup_cfg(os.path.join(ROOT, SETUPS[method][0][0][1])).SOLVER.MAX_ITER


def schedule_opts(iters: int, seed: int):
    """The student schedule: LR drops (x0.1) at 75 % and 92 % of ``iters``."""
    steps = sorted({s for s in (int(iters * 0.75), int(iters * 0.92)) if 0 < s < iters})
    text = "(" + ", ".join(map(str, steps)) + ("," if len(steps) == 1 else "") + ")"
    return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", text, "SEED", str(seed)]


def run_folder(args, row: str) -> str:
    slug = row.replace("+ ", "").replace(",", "").replace(" ", "_")
    return os.path.join(args.output, args.method, f"iters{args.iters}_seed{args.seed}", slug)


def run(args) -> dict:
    rows, teacher_cfg, columns = SETUPS[args.method]
    teacher = ensure_trained(teacher_cfg)
    common = schedule_opts(args.iters, args.seed) + list(args.opts or [])
    table = []
    for name, config, opts in rows:
        if args.rows and name not in args.rows:
            continue
        out = run_folder(args, name)
        distilled = config != rows[0][1]  # every row but the plain student
        teacher_opts = ["DISTILL.TEACHER.WEIGHTS", teacher] if distilled else []
        rec = train_and_evaluate(config, common + opts + teacher_opts, out)
        table.append({"row": name, "command": rec["command"], "train_seconds": rec["train_seconds"], **rec["metrics"]})
    harmony = ["DISTILL.EVAL.HARMONY", "True"] if args.method == "tbd" else []
    table.append({"row": "teacher", "command": f"(trained by {teacher_cfg})", **evaluate(teacher_cfg, harmony, teacher)})
    return {"method": args.method, "iters": args.iters, "seed": args.seed, "columns": columns, "rows": table}


def markdown(summary: dict) -> str:
    cols = summary["columns"]
    lines = ["| row | " + " | ".join(cols) + " | train s |", "|---" * (len(cols) + 2) + "|"]
    for r in summary["rows"]:
        vals = []
        for c in cols:
            v = r.get(c)
            vals.append("-" if v is None else (f"{100 * v:.1f} %" if c == "harmonious_ratio" else f"{v:.2f}"))
        lines.append(f"| {r['row']} | " + " | ".join(vals) + f" | {r.get('train_seconds', '-')} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    summary = run(args)
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, f"{args.method}_seed{args.seed}.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    print(markdown(summary))
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
