"""Where a training step's time goes: torch's profiler over a few steps of one config.

    python -m benchmarks.profile_step --config-file configs/quickstart/retinanet_R34_FPN_teacher.yaml
    python -m benchmarks.profile_step --config-file configs/quickstart/tar_faster_rcnn.yaml --threads 2 --by-shape

Profile before optimising: ``step_cost`` says how much a distillation step costs
next to a student step; this script says which operators spend the time of any
quickstart training step, a plain model's (a teacher, a student) or a distilled
one's. It builds the config's model (a distilled config: the Distiller with a
random teacher checkpoint, as ``step_cost`` builds it), takes one fixed batch of
the built-in ``--dataset`` at the config's training size, trains ``--warmup``
steps unmeasured, then ``--iters`` steps under ``torch.profiler`` (forward,
backward, SGD step at learning rate 0, so every step does the same work), and
prints the seconds per step and the operators with the largest self CPU time,
each with its share of the total (``--by-shape``: one line per operator and
input shapes, which tells one convolution from another).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Dict, List

import torch

from . import cli, setups as lab
from .step_cost import build_distiller, make_batch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE", help="any quickstart config, plain or distilled")
    p.add_argument("--iters", type=int, default=3, help="profiled training steps (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps before them (default 2)")
    p.add_argument("--batch", type=int, default=0,
                   help="images per step (default 0: the config's SOLVER.IMS_PER_BATCH)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--top", type=int, default=15, help="operators listed (default 15)")
    p.add_argument("--by-shape", action="store_true", help="one line per operator and input shapes")
    p.add_argument("--dataset", default="shapes_val", help="built-in split the batch comes from (default shapes_val)")
    cli.add_opts_argument(p, "extra config opts, e.g. -- MODEL.RESNETS.DEPTH 18")
    args = p.parse_args(argv)
    cli.check_opts(p, args)
    if not os.path.isfile(args.config_file):
        p.error(f"--config-file {args.config_file!r}: no such file")
    for flag in ("iters", "threads", "top"):
        cli.check_positive(p, "--" + flag, getattr(args, flag))
    for flag in ("warmup", "batch"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    from d2_distill.data import SPLITS

    if args.dataset not in SPLITS:
        p.error(f"--dataset {args.dataset!r} is not a built-in split ({', '.join(SPLITS)})")
    return args


def build(args, tmp: str):
    """(model in train mode, its trainable parameters, the batch) on CPU."""
    from detectron2.modeling import build_model

    from d2_distill.engine import setup_cfg

    opts = ["MODEL.DEVICE", "cpu", *args.opts]
    cfg = setup_cfg(args.config_file, opts)
    batch_size = args.batch or cfg.SOLVER.IMS_PER_BATCH
    size = cfg.INPUT.MIN_SIZE_TRAIN[0]
    if cfg.MODEL.META_ARCHITECTURE == "Distiller":
        config = os.path.relpath(os.path.abspath(args.config_file), lab.ROOT)
        _, model, batch, _ = build_distiller(config, "cpu", list(args.opts), tmp, args.dataset, size, batch_size)
    else:
        model = build_model(cfg)
        batch = make_batch(args.dataset, size, batch_size, cfg.INPUT.FORMAT)
    model.train()
    return model, [q for q in model.parameters() if q.requires_grad], batch


def profile(args) -> Dict:
    """Runs the steps; returns {"seconds_per_step", "total_s", "ops": [{name, shapes, self_s, share}]}."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    from detectron2.utils.events import EventStorage

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="profile_step_") as tmp, EventStorage(0):
        model, params, batch = build(args, tmp)
        opt = torch.optim.SGD(params, lr=0.0, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            sum(model(batch).values()).backward()
            opt.step()

        for _ in range(args.warmup):
            step()
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=args.by_shape) as prof:
            t0 = time.perf_counter()
            for _ in range(args.iters):
                step()
            seconds = (time.perf_counter() - t0) / args.iters
    events = prof.key_averages(group_by_input_shape=args.by_shape)
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    ops: List[Dict] = [
        {"name": e.key, "shapes": str(e.input_shapes) if args.by_shape else "",
         "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / 1e6 / total if total else 0.0}
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]
    ]
    return {"seconds_per_step": seconds, "total_s": total, "ops": ops}


def format_table(result: Dict, iters: int) -> str:
    lines = [f"{result['seconds_per_step']:.3f} s per step (profiler on, {iters} steps); "
             f"self CPU time {result['total_s']:.2f} s",
             "| operator | input shapes | self s per step | share |", "|---|---|---|---|"]
    for op in result["ops"]:
        lines.append(f"| {op['name']} | {op['shapes']} | {op['self_s'] / iters:.3f} | {100 * op['share']:.1f} % |")
    return "\n".join(lines)


def main(argv=None) -> Dict:
    args = parse_args(argv)
    result = profile(args)
    print(format_table(result, args.iters))
    return result


if __name__ == "__main__":
    main()
