"""Plain vs distilled student AP over several seeds: is the gain larger than seed noise,
and how much of the teacher-student gap does distillation close?

    python -m benchmarks.distill_gain                          # every method, seeds 0 1 2
    python -m benchmarks.distill_gain --methods tbd pkd --seeds 0 1 2 3 4
    python -m benchmarks.distill_gain --methods tar_faster_rcnn_paper   # one config of a method

For every quickstart config of each method (``benchmarks.setups``) and every
seed it trains and evaluates the plain student and the full method, with the
same rows, schedule and run folders as the ablation and the demo (so their runs
are shared and a finished run is never repeated). The teacher is the config's
quickstart teacher (trained first if missing) unless ``--teacher-weights`` names
one, and it is evaluated on the same validation split.

Prints per config: AP per seed (plain / distilled / difference), mean ± sample
sd, whether the distilled student is better on every seed, and the gap closed,
(distilled − plain) / (teacher − plain) in %, per seed and on the means; writes
everything to ``--output`` (JSON).
"""
from __future__ import annotations

import argparse
from typing import Dict, List

from . import cli, parallel, setups as lab, stats
from .ablation import TEACHER_ID, compare_with_plain
from .runs import setup_logging

METRIC = "AP"


def _parse_teacher_weights(p: argparse.ArgumentParser, values: List[str], chosen, found) -> Dict[str, str]:
    """METHOD=PATH or CONFIG=PATH (PATH alone when every chosen config has the same
    teacher config) -> {config stem: path}."""
    def matching(name, setups):
        return [s.key for s in setups if name.lower() in (s.key, s.method.lower())]

    out: Dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        keys = matching(name, chosen) if sep else []
        if not keys:
            if sep and matching(name, [s for ss in found.values() for s in ss]):
                p.error(f"--teacher-weights {v!r}: {name!r} is not in --methods")
            if len({s.teacher_config for s in chosen}) != 1:  # a bare PATH (which may itself contain '=')
                p.error(f"--teacher-weights {v!r}: the chosen configs have different teachers; write "
                        "METHOD=PATH or CONFIG=PATH (e.g. tar=teacher.pth)")
            keys, path = [s.key for s in chosen], v
        cli.check_file(p, f"--teacher-weights {v!r}", path)
        for k in keys:
            if k in out:
                p.error(f"--teacher-weights: two paths for {k}")
            out[k] = path
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    found = lab.discover_setups()
    configs = {s.key: s for ss in found.values() for s in ss}
    p.add_argument("--methods", nargs="+", type=str.lower, default=sorted(found), metavar="METHOD",
                   help=f"methods to compare, any of {', '.join(sorted(found))} (default: all; every "
                        "quickstart config of each), or single configs by stem, any of "
                        f"{', '.join(sorted(configs))}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="SEED",
                   help="training seeds (default 0 1 2)")
    p.add_argument("--iters", type=int, default=None,
                   help="student schedule (SOLVER.MAX_ITER); default: each plain student config's own")
    p.add_argument("--runs", default="output/runs", help="folder of the runs, shared with the ablation and the demo")
    p.add_argument("--output", default="output/benchmarks/distill_gain.json", help="JSON written here")
    p.add_argument("--teacher-weights", action="append", default=[], metavar="[METHOD=]PATH",
                   help="use this teacher checkpoint instead of the quickstart teacher (METHOD=PATH or "
                        "CONFIG=PATH, e.g. pkd_retinanet=t.pth; PATH alone when all chosen configs share one teacher; repeatable)")
    cli.add_jobs_argument(p)
    cli.add_opts_argument(p, "extra config opts for every student run and the teacher's evaluation")
    args = p.parse_args(argv)
    cli.check_opts(p, args)
    args.methods = cli.check_choices(p, "--methods", args.methods, sorted(found) + sorted(configs))
    chosen = [s for m in args.methods for s in found.get(m, [configs.get(m)])]
    args.setups = list({s.key: s for s in chosen}.values())  # a method and one of its configs: once
    cli.check_seeds(p, args.seeds)
    cli.check_positive(p, "--iters", args.iters)
    cli.check_positive(p, "--jobs", args.jobs)
    args.teacher_weights = _parse_teacher_weights(p, args.teacher_weights, args.setups, found)
    return args


def compare(setup, args, teacher: str) -> Dict:
    """The plain and the full row of ``setup`` over the seeds, compared by the
    ablation's own :func:`benchmarks.ablation.compare_with_plain` (one code path for
    vs plain, every seed and gap closed), under this script's JSON keys."""
    iters = args.iters or lab.default_iters(setup)
    t_ap = lab.evaluate_teacher(setup, teacher, args.opts).get(METRIC, float("nan"))
    rows = {"plain": lab.plain_row(setup), "distilled": lab.full_row(setup)}
    recs = {k: [lab.train_row(row, args.runs, iters, seed, teacher, args.opts) for seed in args.seeds]
            for k, row in rows.items()}
    table = [{"row": rows[k].name, "id": rows[k].id, "per_seed": [{"seed": seed, METRIC: rec["metrics"].get(METRIC, float("nan"))}
                                                for seed, rec in zip(args.seeds, recs[k])]} for k in rows]
    for entry in table:
        entry[METRIC] = stats.mean_sd([x[METRIC] for x in entry["per_seed"]])[0]
    table.append({"row": "teacher", "id": TEACHER_ID, METRIC: t_ap})
    compare_with_plain(table)
    plain, full = table[0], table[1]
    per_seed = [{
        "seed": seed, "plain": p[METRIC], "distilled": d[METRIC], "diff": diff,
        "gap_closed_pct": stats.gap_closed(d[METRIC], p[METRIC], t_ap),
        "plain_run": pr["run"], "distilled_run": dr["run"], "plain_command": pr["command"], "distilled_command": dr["command"],
    } for seed, p, d, diff, pr, dr in zip(args.seeds, plain["per_seed"], full["per_seed"], full["vs_plain_per_seed"],
                                          recs["plain"], recs["distilled"])]
    (pm, ps), (dm, ds) = (stats.mean_sd([s[k] for s in per_seed]) for k in ("plain", "distilled"))
    return {
        "method": setup.method, "config": setup.config, "teacher_config": setup.teacher_config,
        "teacher_weights": teacher, "teacher_AP": t_ap, "iters": iters, "seeds": list(args.seeds),
        "plain_mean": pm, "plain_sd": ps, "distilled_mean": dm, "distilled_sd": ds,
        "diff_mean": full["vs_plain"], "diff_sd": full["vs_plain_sd"], "gap_closed_pct": full["gap_closed_pct"],
        "distilled_better_every_seed": full["better_every_seed"], "per_seed": per_seed,
    }


def run(args) -> Dict:
    cli.check_repo_root()
    summary = {"metric": METRIC, "seeds": list(args.seeds), "runs": args.runs, "opts": list(args.opts),
               "sd": "sample standard deviation over seeds (n - 1); 0 for one seed",
               "gap_closed": "(distilled - plain) / (teacher - plain), %", "configs": {}}
    teachers = {s.key: lab.ensure_teacher(s, args.teacher_weights.get(s.key, "")) for s in args.setups}
    parallel.train_parallel([(row, args.runs, args.iters or lab.default_iters(s), seed, teachers[s.key], args.opts)
                        for s in args.setups for seed in args.seeds for row in (lab.plain_row(s), lab.full_row(s))],
                       args.jobs)
    for s in args.setups:
        summary["configs"][s.key] = compare(s, args, teachers[s.key])
    return summary


def markdown(summary: Dict) -> str:
    f = stats.fmt
    lines = [
        f"{summary['metric']} on the built-in validation split, seeds {' '.join(map(str, summary['seeds']))} "
        "(mean ± sample sd); gap closed = (distilled − plain) / (teacher − plain)",
        "",
        "| method | config | iterations | teacher | plain | distilled | distilled − plain | gap closed "
        "| better on every seed | per seed: plain / distilled (gap closed) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in summary["configs"].items():
        per = "; ".join(f"seed {s['seed']}: {f(s['plain'])} / {f(s['distilled'])} ({f(s['gap_closed_pct'], digits=0)} %)"
                        for s in r["per_seed"])
        lines.append(
            f"| {r['method']} | {key} | {r['iters']} | {f(r['teacher_AP'])} | {f(r['plain_mean'])} ± {f(r['plain_sd'])} "
            f"| {f(r['distilled_mean'])} ± {f(r['distilled_sd'])} | {f(r['diff_mean'], True)} ± {f(r['diff_sd'])} "
            f"| {f(r['gap_closed_pct'], digits=0)} % | {'yes' if r['distilled_better_every_seed'] else 'no'} | {per} |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    summary = run(args)
    stats.report(args.output, summary, markdown(summary))
    return summary


if __name__ == "__main__":
    main()
