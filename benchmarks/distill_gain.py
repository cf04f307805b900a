#!/usr/bin/env python
"""Plain vs distilled student AP over several seeds: is the gain larger than seed noise?

    python benchmarks/distill_gain.py                       # TAR and TBD, seeds 0 1 2
    python benchmarks/distill_gain.py --methods tbd --seeds 0 1 2 3 4

For every method and seed it trains and evaluates the ablation's "plain student"
row and its full-method row ("full TAR" / "full TBD") of ``benchmarks/ablation.py``,
with the same configs, opts, schedule (``schedule_opts``) and run folders
(``run_folder``), through ``train_and_evaluate``: runs are cached and shared with
the ablation and the demo (seed 0 are the ablation's own runs), and a finished
run is never repeated. The teacher is the ablation's (trained first if missing)
unless ``--teacher-weights`` names one.

Prints per method the plain and distilled AP (mean ± sample std over seeds),
the per-seed differences (distilled - plain) and whether the distilled student
is better on every seed; writes everything to ``--output`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from types import SimpleNamespace
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.ablation import SETUPS, check_iters, default_iters, run_folder, schedule_opts  # noqa: E402

METRIC = "AP"


def full_row(method: str):
    """The ablation row with the full method: ('full TAR', config, opts)."""
    rows = SETUPS[method][0]
    name = f"full {method.upper()}"
    for row in rows:
        if row[0] == name:
            return row
    raise KeyError(f"benchmarks/ablation.py has no {name!r} row for --method {method}")


def _parse_teacher_weights(p: argparse.ArgumentParser, values: List[str], methods: List[str]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for v in values:
        method, sep, path = v.partition("=")
        if not sep or method not in SETUPS:  # a bare PATH (which may itself contain '=')
            if len(methods) != 1:
                p.error(f"--teacher-weights {v!r}: with several methods write METHOD=PATH (e.g. tar=teacher.pth)")
            method, path = methods[0], v
        if method not in methods:
            p.error(f"--teacher-weights {v!r}: method {method!r} is not in --methods {' '.join(methods)}")
        if method in out:
            p.error(f"--teacher-weights: two paths for {method}")
        if "://" not in path and not os.path.isfile(path):
            p.error(f"--teacher-weights {v!r}: no such file {path!r}")
        out[method] = path
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["tar", "tbd"], metavar="METHOD",
                   help=f"methods to compare, any of {', '.join(sorted(SETUPS))} (default: tar tbd)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="SEED",
                   help="training seeds (default 0 1 2); seed 0 runs are the ablation's")
    p.add_argument("--iters", type=int, default=None,
                   help="student schedule (SOLVER.MAX_ITER); default: each student config's own")
    p.add_argument("--runs", default="output/runs",
                   help="folder of the runs, shared with ablation.py and demo.py (default output/runs)")
    p.add_argument("--output", default="output/benchmarks/distill_gain.json", help="JSON written here")
    p.add_argument("--teacher-weights", action="append", default=[], metavar="[METHOD=]PATH",
                   help="use this teacher checkpoint instead of training the ablation's teacher "
                        "(METHOD=PATH, or PATH alone with a single method; repeatable). Runs with another "
                        "teacher have other opts, so they replace the cached runs in the same folders")
    p.add_argument("opts", nargs=argparse.REMAINDER,
                   help="extra config opts for every student run, last (after -- when they follow a list option)")
    args = p.parse_args(argv)
    if args.opts and args.opts[0] == "--":
        args.opts = args.opts[1:]

    unknown = [m for m in args.methods if m not in SETUPS]
    if unknown:
        p.error(f"--methods: unknown method(s) {', '.join(unknown)}; choose from {', '.join(sorted(SETUPS))}")
    args.methods = list(dict.fromkeys(args.methods))
    if not args.seeds:
        p.error("--seeds: give at least one seed")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds: repeated seed in {args.seeds}")
    negative = [s for s in args.seeds if s < 0]
    if negative:
        p.error(f"--seeds must be >= 0 (detectron2 draws a random seed for a negative SEED), got {negative}")
    check_iters(p, args.iters)
    if args.opts and len(args.opts) % 2:
        p.error(f"opts must be KEY VALUE pairs, got {args.opts}")
    args.teacher_weights = _parse_teacher_weights(p, args.teacher_weights, args.methods)
    return args


def _mean_std(values: List[float]):
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if len(vals) != len(values) or not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _run_record(rec: Dict, folder: str) -> Dict:
    return {
        "run": folder,
        "command": rec.get("command"),
        "train_seconds": rec.get("train_seconds"),
        METRIC: rec.get("metrics", {}).get(METRIC, float("nan")),
        "metrics": rec.get("metrics", {}),
    }


def run_method(method: str, args, teacher: str) -> Dict:
    from d2_distill.engine.runs import train_and_evaluate

    rows = SETUPS[method][0]
    plain_name, plain_cfg, plain_opts = rows[0]
    full_name, full_cfg, full_opts = full_row(method)
    iters = args.iters or default_iters(method)
    per_seed = []
    for seed in args.seeds:
        where = SimpleNamespace(output=args.runs, method=method, iters=iters, seed=seed)
        common = schedule_opts(iters, seed) + list(args.opts or [])
        # exactly the ablation's opts (common + row + teacher), so the runs are shared
        plain_dir = run_folder(where, plain_name)
        plain = train_and_evaluate(plain_cfg, common + plain_opts, plain_dir)
        full_dir = run_folder(where, full_name)
        full = train_and_evaluate(full_cfg, common + full_opts + ["DISTILL.TEACHER.WEIGHTS", teacher], full_dir)
        p, d = _run_record(plain, plain_dir), _run_record(full, full_dir)
        per_seed.append({"seed": seed, "plain": p, "distilled": d, "diff": d[METRIC] - p[METRIC]})

    plain_ap = [s["plain"][METRIC] for s in per_seed]
    dist_ap = [s["distilled"][METRIC] for s in per_seed]
    diffs = [s["diff"] for s in per_seed]
    (pm, ps), (dm, ds), (fm, fs) = _mean_std(plain_ap), _mean_std(dist_ap), _mean_std(diffs)
    return {
        "plain_row": plain_name,
        "distilled_row": full_name,
        "teacher_weights": teacher,
        "iters": iters,
        "seeds": list(args.seeds),
        "plain_AP": plain_ap,
        "distilled_AP": dist_ap,
        "diff": diffs,
        "plain_mean": pm, "plain_std": ps,
        "distilled_mean": dm, "distilled_std": ds,
        "diff_mean": fm, "diff_std": fs,
        "distilled_better_every_seed": all(x > 0 for x in diffs),  # NaN compares False
        "per_seed": per_seed,
    }


def run(args) -> Dict:
    from d2_distill.engine.runs import ensure_trained

    missing = [c for m in args.methods for c in (SETUPS[m][0][0][1], full_row(m)[1]) if not os.path.isfile(c)]
    if missing:
        raise SystemExit(
            f"{missing[0]} not found from {os.getcwd()}: run from the repository root ({ROOT}), "
            "like benchmarks/ablation.py (the run cache keys on these relative paths)"
        )
    summary = {
        "metric": METRIC,
        "seeds": list(args.seeds),
        "runs": args.runs,
        "opts": list(args.opts or []),
        "std": "sample standard deviation over seeds (n - 1); 0 for one seed",
        "methods": {},
    }
    for m in args.methods:
        teacher = args.teacher_weights.get(m) or ensure_trained(SETUPS[m][1])
        summary["methods"][m] = run_method(m, args, teacher)
    return summary


def _fmt(v: Optional[float], signed: bool = False) -> str:
    if v is None or math.isnan(v):
        return "nan"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def markdown(summary: Dict) -> str:
    lines = [
        f"{summary['metric']} on the built-in dataset, seeds "
        f"{' '.join(map(str, summary['seeds']))} (mean ± sample std)",
        "",
        "| method | iterations | plain | distilled | distilled − plain per seed | mean gain | better on every seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, r in summary["methods"].items():
        per = ", ".join(f"{_fmt(d, True)} (seed {s})" for s, d in zip(r["seeds"], r["diff"]))
        lines.append(
            f"| {m.upper()} | {r['iters']} | {_fmt(r['plain_mean'])} ± {_fmt(r['plain_std'])} "
            f"| {_fmt(r['distilled_mean'])} ± {_fmt(r['distilled_std'])} | {per} "
            f"| {_fmt(r['diff_mean'], True)} ± {_fmt(r['diff_std'])} "
            f"| {'yes' if r['distilled_better_every_seed'] else 'no'} |"
        )
    return "\n".join(lines)


def _json_safe(x):
    """NaN/inf -> None, so the file is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def main(argv=None):
    args = parse_args(argv)
    from d2_distill.engine.runs import setup_logging

    setup_logging()
    summary = run(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(_json_safe(summary), f, indent=1)
    print(markdown(summary))
    print(f"\nwritten {args.output}")
    return summary


if __name__ == "__main__":
    main()
