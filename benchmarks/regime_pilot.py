"""Pilot trainings for choosing the benchmark regime (dataset style, resolution,
schedules), run many at a time on one machine.

    python -m benchmarks.regime_pilot --jobs jobs.json --out DIR [--parallel 6] [--threads 2]

``jobs.json`` is a list of *waves*; a wave is a list of jobs that run in
parallel, and a wave starts when the previous one has finished (so a distilled
job can name a teacher trained in an earlier wave). A job is::

    {"name": "t_c05_1200", "style": {"clutter": 0.5}, "config": "configs/...yaml",
     "opts": ["SOLVER.MAX_ITER", "1200"], "teacher": "<name of an earlier job>",
     "test": "shapes_tune"}

Each style gets its own data folder (``DIR/data/<style>``), generated once.
Every job writes ``DIR/<name>/results.json`` (AP on its test split, seconds,
seconds per iteration); a finished job is not repeated. The results are
summarised in ``DIR/summary.json``. Settings are chosen on ``shapes_tune``;
``shapes_val`` is for reporting.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _style_key(style: dict) -> str:
    return hashlib.sha1(json.dumps(style, sort_keys=True).encode()).hexdigest()[:10]


def run_one(job: dict, out: str, threads: int) -> dict:
    """Train and evaluate one job in this process."""
    import torch

    torch.set_num_threads(threads)
    os.environ["D2_DISTILL_DATA"] = os.path.join(out, "data", _style_key(job.get("style", {})))
    from d2_distill.data import shapes

    shapes.STYLE = shapes.ShapesStyle(**job.get("style", {}))
    from detectron2.utils.env import seed_all_rng

    from d2_distill.engine import DistillTrainer, setup_cfg

    folder = os.path.join(out, job["name"])
    opts = list(job.get("opts", [])) + ["OUTPUT_DIR", folder, "DATASETS.TEST", f"('{job.get('test', 'shapes_tune')}',)"]
    if job.get("teacher"):
        opts += ["DISTILL.TEACHER.WEIGHTS", os.path.join(out, job["teacher"], "model_final.pth")]
    cfg = setup_cfg(job["config"], opts)
    seed_all_rng(cfg.SEED)
    start = time.perf_counter()
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    data_s = time.perf_counter() - start
    trainer.train()
    train_s = time.perf_counter() - start - data_s
    res = DistillTrainer.test(cfg, trainer.model)
    record = {
        "job": job,
        "AP": res["bbox"]["AP"],
        "AP50": res["bbox"]["AP50"],
        "APs": res["bbox"].get("APs"),
        "train_s": round(train_s, 1),
        "s_per_it": round(train_s / cfg.SOLVER.MAX_ITER, 4),
        "total_s": round(time.perf_counter() - start, 1),
        "device": str(cfg.MODEL.DEVICE),
    }
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record


def _launch(job: dict, out: str, threads: int) -> dict:
    path = os.path.join(out, job["name"], "results.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    os.makedirs(os.path.join(out, job["name"]), exist_ok=True)
    log = os.path.join(out, job["name"], "log.txt")
    with open(log, "w") as f:
        rc = subprocess.call(
            [sys.executable, "-m", "benchmarks.regime_pilot", "--one", json.dumps(job), "--out", out,
             "--threads", str(threads)],
            stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
        )
    if rc != 0 or not os.path.isfile(path):
        with open(log) as f:
            tail = f.read()[-1500:]
        return {"job": job, "error": f"exit {rc}", "log_tail": tail}
    with open(path) as f:
        return json.load(f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", help="JSON file: a list of waves of jobs")
    p.add_argument("--one", help="(internal) run this one job (JSON) in this process")
    p.add_argument("--out", required=True)
    p.add_argument("--parallel", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    args.out = os.path.abspath(args.out)
    if args.one:
        run_one(json.loads(args.one), args.out, args.threads)
        return
    with open(args.jobs) as f:
        waves = json.load(f)
    results = []
    for wave in waves:
        with ThreadPoolExecutor(args.parallel) as pool:
            for rec in pool.map(lambda j: _launch(j, args.out, args.threads), wave):
                results.append(rec)
                name = rec["job"]["name"]
                if "error" in rec:
                    print(f"{name}: FAILED {rec['error']}\n{rec['log_tail']}", flush=True)
                else:
                    print(f"{name}: AP {rec['AP']:.2f} AP50 {rec['AP50']:.2f} "
                          f"{rec['train_s']:.0f}s ({rec['s_per_it']:.3f} s/it)", flush=True)
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
