"""Is the quickstart teacher representative? Each teacher trained with several seeds.

    python -m benchmarks.teacher_seeds                                     # every quickstart teacher, seeds 0 1 2
    python -m benchmarks.teacher_seeds --teachers retinanet_R34_FPN_teacher --seeds 1

The lab distils every student from one teacher per pair: the quickstart teacher,
trained with its config's ``SEED``. A benchmark regime is only worth something
when another seed would give about the same teacher, so this script trains each
teacher config (the distilled quickstart configs' ``DISTILL.TEACHER.CONFIG_FILE``,
found like every lab script finds its setups) once per seed and evaluates it on
the config's validation split.

A seed whose merged config is exactly the quickstart teacher's (same
fingerprint, see ``benchmarks.runs``) is the quickstart run: reused with its
``results.json`` when it is trained, else trained into the config's OUTPUT_DIR,
where the demo, ``ablation`` and ``distill_gain`` then find it. Any other seed
trains into ``<runs>/<teacher stem>/seed<S>`` through the run cache (a finished
run is never repeated). Prints AP per seed,
mean ± sample sd and the largest distance of a seed from the mean; writes all of
it to ``--output`` (JSON).

``--eval-opts KEY VALUE ...`` evaluates each trained teacher once more with these
opts on top of its training config (training is untouched, so no run is
repeated), for settings that only act at test time: the split
(``DATASETS.TEST "('shapes_tune',)"``) or the score threshold
(``MODEL.RETINANET.SCORE_THRESH_TEST 0.0``). The table then shows both the AP
of the run's own evaluation ("as trained") and the AP with these opts, which the
statistics use.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List

from . import cli, setups as lab, stats
from .runs import fingerprint, setup_logging

METRIC = "AP"


def teacher_configs() -> Dict[str, str]:
    """{file stem: repository-relative path} of the discovered setups' teacher configs."""
    out = {}
    for found in lab.discover_setups().values():
        for s in found:
            out[os.path.splitext(os.path.basename(s.teacher_config))[0]] = s.teacher_config
    return dict(sorted(out.items()))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    found = teacher_configs()
    p.add_argument("--teachers", nargs="+", default=list(found), metavar="TEACHER",
                   help=f"teacher configs by file stem, any of {', '.join(found)} (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="SEED",
                   help="training seeds (default 0 1 2)")
    p.add_argument("--runs", default="output/teachers", help="folder of the teachers of other seeds")
    p.add_argument("--output", default="output/benchmarks/teacher_seeds.json", help="JSON written here")
    p.add_argument("--eval-opts", nargs="+", default=[], metavar="KEY_VALUE",
                   help="config opts for a second evaluation of each trained teacher (test-time settings, "
                        "e.g. DATASETS.TEST \"('shapes_tune',)\"); the statistics use its AP")
    cli.add_opts_argument(p, "extra config opts for every teacher run")
    args = p.parse_args(argv)
    cli.check_opts(p, args)
    if len(args.eval_opts) % 2:
        p.error(f"--eval-opts must be KEY VALUE pairs, got {args.eval_opts}")
    args.teachers = cli.check_choices(p, "--teachers", args.teachers, list(found))
    args.teacher_configs = {t: found[t] for t in args.teachers}
    cli.check_seeds(p, args.seeds)
    return args


def train_seed(config_file: str, seed: int, runs: str, opts: List[str], quickstart: str = "") -> Dict:
    """One teacher seed. The quickstart run (default: the config's own OUTPUT_DIR,
    where the demo and every lab script look for the teacher) when this seed and
    ``opts`` leave the config as it is (the fingerprint ignores OUTPUT_DIR): reused
    when trained, else trained there, so that the next demo or ablation finds it.
    Any other seed or opts train into ``<runs>/<teacher stem>/seed<S>`` through the
    run cache."""
    from d2_distill.engine import setup_cfg

    from .runs import _set_aside, train_and_evaluate

    run_opts = ["SEED", str(seed), *opts]
    own = setup_cfg(config_file)
    quickstart = quickstart or own.OUTPUT_DIR
    key = fingerprint(setup_cfg(config_file, run_opts))
    results = os.path.join(quickstart, "results.json")
    if os.path.isfile(results):
        with open(results) as f:
            cached = json.load(f)
        if cached.get("fingerprint") == key:
            return {**cached, "run": quickstart}
    if key == fingerprint(own):  # the quickstart teacher itself, not trained yet
        if os.path.isdir(quickstart) and os.listdir(quickstart):
            _set_aside(quickstart, f"not a finished run of {config_file}")  # nothing is lost
        return {**train_and_evaluate(config_file, run_opts, quickstart, force=True), "run": quickstart}
    folder = os.path.join(runs, os.path.splitext(os.path.basename(config_file))[0], f"seed{seed}")
    return {**train_and_evaluate(config_file, run_opts, folder), "run": folder}


def run(args) -> Dict:
    cli.check_repo_root()
    from .runs import evaluate

    summary = {"metric": METRIC, "seeds": list(args.seeds), "opts": list(args.opts),
               "eval_opts": list(args.eval_opts),
               "sd": "sample standard deviation over seeds (n - 1); 0 for one seed", "teachers": {}}
    for name, config_file in args.teacher_configs.items():
        per_seed = []
        for seed in args.seeds:
            rec = train_seed(config_file, seed, args.runs, list(args.opts))
            entry = {"seed": seed, METRIC: rec["metrics"].get(METRIC, float("nan")),
                     "run": rec["run"], "command": rec["command"]}
            if args.eval_opts:  # the same weights, evaluated once more with the test-time opts
                again = evaluate(config_file, ["SEED", str(seed), *args.opts, *args.eval_opts],
                                 os.path.join(rec["run"], "model_final.pth"))
                entry["as_trained"], entry[METRIC] = entry[METRIC], again.get(METRIC, float("nan"))
            per_seed.append(entry)
        values = [s[METRIC] for s in per_seed]
        mean, sd = stats.mean_sd(values)
        summary["teachers"][name] = {
            "config": config_file, "mean": mean, "sd": sd,
            "max_abs_dev": max(abs(v - mean) for v in values), "per_seed": per_seed,
        }
    return summary


def markdown(summary: Dict) -> str:
    f = stats.fmt
    where = (f"evaluated with {' '.join(summary['eval_opts'])} (as trained: the run's own evaluation)"
             if summary.get("eval_opts") else "on the built-in validation split")
    lines = [
        f"{summary['metric']} {where}, seeds {' '.join(map(str, summary['seeds']))} "
        "(mean ± sample sd; max |dev| = the largest distance of a seed from the mean)",
        "",
        "| teacher | per seed | mean ± sd | max abs dev |",
        "|---|---|---|---|",
    ]
    for name, r in summary["teachers"].items():
        per = ", ".join(f"{f(s[summary['metric']])} (seed {s['seed']}"
                        + (f", as trained {f(s['as_trained'])}" if "as_trained" in s else "") + ")"
                        for s in r["per_seed"])
        lines.append(f"| {name} | {per} | {f(r['mean'])} ± {f(r['sd'])} | {f(r['max_abs_dev'])} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    summary = run(args)
    stats.report(args.output, summary, markdown(summary))
    return summary


if __name__ == "__main__":
    main()
