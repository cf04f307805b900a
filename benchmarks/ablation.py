"""Ablation of a distillation method on the built-in dataset, over one or more seeds.

    python -m benchmarks.ablation --method tar --seeds 0 1 2
    python -m benchmarks.ablation --method tbd --baselines
    python -m benchmarks.ablation --method pkd --config pkd_retinanet --rows "plain student" "full PKD"
    python -m benchmarks.ablation --method tar --seeds 0 --evaluate-on shapes_tune   # choose settings

Rows (``benchmarks.setups.ablation_rows``): the plain student, ``+ <component>``
for each of the method's components, the full method and the method's extra
rows (decay, gates, weights, ...); ``--baselines`` adds the full rows of every
other method on the same student architecture. Trains the teacher first if its
checkpoint is missing, then every row for every seed on the same schedule,
evaluates each with COCOEvaluator and the harmony evaluator, and prints a
markdown table of mean ± sample sd over the seeds, AP per seed and, when the
plain student is among the rows, each row's paired difference with the plain
student of the same seed (per seed, mean ± sd, better on every seed) and the
teacher–plain gap it closes, (row − plain) / (teacher − plain) on the means; writes
``<output>/ablation_<config>_<iters>it_seeds<S-S-...>.json`` (:func:`table_path`: a
call with other seeds, iterations, rows or opts writes a file of its own, so it
never replaces the table of an earlier call). Finished runs are reused; rows whose merged
config is the same (e.g. an extra row that restates a default, or another
config's row with the same settings anywhere under ``--output``) share one run.
``--evaluate-on shapes_tune`` evaluates the same runs (and the teacher) on the
tuning split instead (the same name ending in ``_on_shapes_tune.json``): settings are
chosen on that table, results reported from the default one, with no run trained twice.
"""
import argparse
import os

from . import cli, parallel, setups as lab, stats
from .runs import console_and_log, evaluate_on, fingerprint, setup_logging

COLUMNS = ("AP", "AP50", "AP75", "harmonious_ratio", "mean_abs_gap")
TEACHER_ID = "teacher"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    found = lab.discover_setups()
    p.add_argument("--method", type=str.lower, choices=sorted(found), required=True)
    p.add_argument("--config", default="", help="which of the method's quickstart configs (default: the first)")
    p.add_argument("--iters", type=int, default=None,
                   help="student schedule (SOLVER.MAX_ITER); default: the plain student config's own")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="SEED", help="training seeds (default 0)")
    p.add_argument("--output", default="output/runs", help="folder of the runs (shared with the demo) and the JSON")
    p.add_argument("--rows", nargs="*", help="only these rows, by id (plain_student, full_TAR, ...) or label "
                                             "(default: all)")
    p.add_argument("--no-extra", action="store_true", help="only plain / + components / full")
    p.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY VALUE"),
                   help="an extra row: the config with these opts (repeat the flag for more rows), "
                        "e.g. --variant fw0.1 DISTILL.TAR.FEAT_WEIGHT 0.1; NAME is the row's name and folder")
    p.add_argument("--baselines", action="store_true",
                   help="also the full rows of the other methods with a config for this student architecture")
    p.add_argument("--teacher-weights", default="", help="use this teacher checkpoint instead of the quickstart's")
    p.add_argument("--evaluate-on", default="", metavar="SPLIT",
                   help="evaluate every run (and the teacher) on this split instead of the config's "
                        "DATASETS.TEST, e.g. shapes_tune to choose settings: the runs themselves are "
                        "the same (trained once, cached), only their evaluation differs")
    cli.add_jobs_argument(p)
    cli.add_opts_argument(p, "extra config opts for every student run")
    args = p.parse_args(argv)
    cli.check_opts(p, args)
    cli.check_positive(p, "--iters", args.iters)
    cli.check_positive(p, "--jobs", args.jobs)
    cli.check_seeds(p, args.seeds)
    cli.check_file(p, "--teacher-weights", args.teacher_weights)
    for v in args.variant:
        if len(v) < 3 or len(v) % 2 == 0:
            p.error(f"--variant needs a name and KEY VALUE pairs, got {v}")
    if args.evaluate_on:
        from d2_distill.data import SPLITS

        if args.evaluate_on not in SPLITS:
            p.error(f"--evaluate-on: unknown split {args.evaluate_on!r}; valid: {', '.join(sorted(SPLITS))}")
    try:
        args.setup = lab.find_setup(found, args.method, args.config)
    except KeyError as e:
        p.error(f"--config: {e.args[0]}")
    args.baseline_setups = [s for m, ss in sorted(found.items()) if m != args.method for s in ss
                            if s.arch == args.setup.arch and s.teacher_config == args.setup.teacher_config
                            ] if args.baselines else []
    if args.iters is None:
        args.iters = lab.default_iters(args.setup)
    return args


def table_path(args) -> str:
    """Where a call's JSON goes, named after what decides its contents:

        <output>/ablation_<config>_<iters>it_seeds<S-S-...>[_<tag>][_on_<split>].json

    ``tag`` (8 hex digits) appears when the call's rows are not the default set
    (``--rows``, ``--no-extra``, ``--baselines``), or it has extra opts or its own
    teacher: a digest of the row names, the opts and the teacher path. Two calls
    share a file only when they would write the same table."""
    import hashlib
    import json

    default = [r.id for r in lab.ablation_rows(args.setup, extra=True)]
    names = [r.id for r in plan(args)]
    name = f"ablation_{args.setup.key}_{args.iters}it_seeds{'-'.join(map(str, args.seeds))}"
    if names != default or args.opts or args.teacher_weights:
        what = json.dumps([names, list(args.opts), args.teacher_weights] + ([args.variant] if args.variant else []))
        name += "_" + hashlib.sha1(what.encode()).hexdigest()[:8]
    if args.evaluate_on:
        name += f"_on_{args.evaluate_on}"
    return os.path.join(args.output, name + ".json")


def plan(args):
    """The rows to run, baselines after the method's rows, filtered by ``--rows``; then
    the ``--variant`` rows."""
    rows = lab.ablation_rows(args.setup, extra=not args.no_extra)
    rows += [lab.full_row(s) for s in args.baseline_setups]
    rows = [r for r in rows if not args.rows or r.id in args.rows or r.name in args.rows]
    return rows + [lab.Row(v[0], args.setup.config, list(v[1:]), id=v[0]) for v in args.variant]  # asked for by name


def same_run_key(row, opts) -> str:
    """What decides a row's runs: the fingerprint of its merged config, with an empty
    DISTILL.SCHEDULE.KIND replaced by the method's default (the same schedule)."""
    from d2_distill.engine import setup_cfg
    from d2_distill.methods import method_class

    cfg = setup_cfg(os.path.join(lab.ROOT, row.config), opts)
    if cfg.MODEL.META_ARCHITECTURE == "Distiller" and not cfg.DISTILL.SCHEDULE.KIND:
        cfg.defrost()
        cfg.DISTILL.SCHEDULE.KIND = method_class(cfg.DISTILL.METHOD).default_schedule
    return fingerprint(cfg)


def missing_key(config: str, opts) -> str:
    """The first KEY of ``opts`` (KEY VALUE ...) that the merged ``config`` lacks, or ''."""
    from d2_distill.engine import setup_cfg

    cfg = setup_cfg(os.path.join(lab.ROOT, config))
    for key in opts[::2]:
        node = cfg
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return key
            node = node[part]
    return ""


def resolve(rows, args, teacher: str):
    """[table entry] per row, nothing trained: ``skipped`` (an option the config does
    not have), ``same_as`` (the merged config of an earlier row), or ``row_obj`` to run."""
    entries, seen = [], {}
    for row in rows:
        entry = {"row": row.name, "id": row.id, "config": row.config}
        opts = lab.row_opts(row, args.iters, args.seeds[0], teacher, args.opts)
        missing = missing_key(row.config, opts)
        if missing:  # an option this version of the method does not have
            entry["skipped"] = f"needs {missing}, which the config does not have"
        else:
            key = same_run_key(row, opts)
            if key in seen:
                entry["same_as"] = seen[key]["row"]
            else:
                entry["row_obj"] = row
                seen[key] = entry
        entries.append(entry)
    return entries


def run(args) -> dict:
    cli.check_repo_root()
    setup, iters = args.setup, args.iters
    teacher = lab.ensure_teacher(setup, args.teacher_weights)
    table = resolve(plan(args), args, teacher)
    parallel.train_parallel([(e["row_obj"], args.output, iters, seed, teacher, args.opts)
                        for e in table if "row_obj" in e for seed in args.seeds], args.jobs)
    done = {}
    for entry in table:
        row = entry.pop("row_obj", None)
        if row is None:
            continue
        entry["per_seed"] = []
        for seed in args.seeds:
            rec = lab.train_row(row, args.output, iters, seed, teacher, args.opts)
            metrics = evaluate_on(rec, args.evaluate_on) if args.evaluate_on else rec["metrics"]
            entry["per_seed"].append({"seed": seed, "run": rec["run"], "command": rec["command"],
                                      "train_seconds": rec["train_seconds"], **metrics})
        for c in COLUMNS:
            entry[c], entry[f"{c}_sd"] = stats.mean_sd([s.get(c) for s in entry["per_seed"]])
        done[entry["row"]] = entry
    for entry in table:
        if "same_as" in entry:
            entry.update({k: v for k, v in done[entry["same_as"]].items() if k not in ("row", "id", "config")})
    from d2_distill.engine import setup_cfg

    on = ["DATASETS.TEST", f"('{args.evaluate_on}',)"] if args.evaluate_on else []
    dataset = setup_cfg(os.path.join(lab.ROOT, setup.config), list(args.opts) + on).DATASETS.TEST[0]
    log = os.path.join(args.output, f"teacher_eval_{dataset}.log")
    with console_and_log(log) as say:  # detectron2's evaluation tables go to the file
        metrics = lab.evaluate_teacher(setup, teacher, list(args.opts) + on)
        say(f"[lab] teacher {teacher}: AP {metrics.get('AP', float('nan')):.2f} on {dataset} (detectron2's log: {log})")
    table.append({"row": "teacher", "id": TEACHER_ID, "config": setup.teacher_config, "weights": teacher, **metrics})
    compare_with_plain(table)
    return {"method": setup.method, "config": setup.config, "iters": iters, "seeds": list(args.seeds),
            "dataset": dataset,
            "columns": list(COLUMNS), "sd": "sample standard deviation over seeds (n - 1); 0 for one seed",
            "rows": table}


def compare_with_plain(table) -> None:
    """Add to every trained row (not the plain student's) ``vs_plain_per_seed`` (its AP
    minus the plain student's AP of the same seed), ``vs_plain`` / ``vs_plain_sd``
    (mean and sample sd of those), ``better_every_seed`` and ``gap_closed_pct``
    ((row − plain) / (teacher − plain) on the means, NaN without a teacher above the
    plain student). Nothing is added when the plain student is not in ``table``."""
    plain = next((r for r in table if r.get("id") == lab.PLAIN_ID and "per_seed" in r), None)
    teacher = next((r for r in table if r.get("id") == TEACHER_ID), {})
    if plain is None:
        return
    plain_ap = {s["seed"]: s.get("AP") for s in plain["per_seed"]}
    for r in table:
        if r is plain or "per_seed" not in r:
            continue
        diffs = [s.get("AP", float("nan")) - plain_ap.get(s["seed"], float("nan")) for s in r["per_seed"]]
        r["vs_plain_per_seed"] = diffs
        r["vs_plain"], r["vs_plain_sd"] = stats.mean_sd(diffs)
        r["better_every_seed"] = all(d > 0 for d in diffs)  # NaN compares False
        r["gap_closed_pct"] = stats.gap_closed(r["AP"], plain["AP"], teacher.get("AP", float("nan")))


def markdown(summary: dict) -> str:
    cols = [c for c in summary["columns"] if any(c in r for r in summary["rows"])]
    paired = any("vs_plain" in r for r in summary["rows"])
    extra = ["vs plain per seed", "vs plain", "better on every seed", "gap closed"] if paired else []
    head = ["AP per seed"] + cols + extra
    lines = [f"{summary['method']} ({summary['config']}), {summary['iters']} iterations, "
             f"AP on {summary.get('dataset', '?')}, seeds "
             f"{' '.join(map(str, summary['seeds']))}: mean ± sample sd"
             + ("; vs plain = the paired difference with the plain student of the same seed; gap closed = "
                "(row − plain) / (teacher − plain) on the means" if paired else ""), "",
             "| row | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for r in summary["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['row']} | " + " | ".join("-" for _ in head) + f" |  ({r['skipped']})")
            continue
        per_seed = r.get("per_seed", [])
        vals = [", ".join(stats.fmt(s.get("AP")) for s in per_seed) or "-"]
        for c in cols:
            v, sd = r.get(c), r.get(f"{c}_sd")
            if v is None:
                vals.append("-")
            elif c == "harmonious_ratio":
                vals.append(f"{100 * v:.1f} %" + (f" ± {100 * sd:.1f}" if sd else ""))
            else:
                digits = 3 if c.startswith("mean_abs") else 2
                vals.append(stats.fmt(v, digits=digits) + (f" ± {stats.fmt(sd, digits=digits)}" if sd else ""))
        if paired:
            if "vs_plain" in r:
                vals += [", ".join(stats.fmt(d, signed=True) for d in r["vs_plain_per_seed"]),
                         f"{stats.fmt(r['vs_plain'], signed=True)} ± {stats.fmt(r['vs_plain_sd'])}",
                         "yes" if r["better_every_seed"] else "no", f"{stats.fmt(r['gap_closed_pct'], signed=True, digits=0)} %"]
            else:
                vals += ["" for _ in extra]
        note = f" (same run as {r['same_as']})" if "same_as" in r else ""
        lines.append(f"| {r['row']}{note} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    summary = run(args)
    stats.report(table_path(args), summary, markdown(summary))
    return summary


if __name__ == "__main__":
    main()
