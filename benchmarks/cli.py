"""Command-line helpers shared by the lab's scripts: common arguments and their checks
(each a usage error that names the flag and the bad value)."""
from __future__ import annotations

import argparse
import os
from typing import List, Sequence

__all__ = ["add_opts_argument", "add_jobs_argument", "check_opts", "check_positive", "check_choices",
           "check_seeds", "check_file", "check_repo_root"]


def add_opts_argument(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("opts", nargs=argparse.REMAINDER, help=help + " (KEY VALUE ..., after -- when they follow a list option)")


def add_jobs_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs", type=int, default=1,
                   help="student runs trained at a time, each in its own process with cores/jobs torch "
                        "threads (default 1: one at a time in this process; 2 suits a 2-core machine)")


def check_opts(p: argparse.ArgumentParser, args) -> None:
    """Drop a leading ``--`` from ``args.opts``; they must be KEY VALUE pairs."""
    if args.opts and args.opts[0] == "--":
        args.opts = args.opts[1:]
    if len(args.opts) % 2:
        p.error(f"opts must be KEY VALUE pairs, got {args.opts}")


def check_positive(p: argparse.ArgumentParser, flag: str, value) -> None:
    if value is not None and value <= 0:
        p.error(f"{flag} must be positive, got {value}")


def check_choices(p: argparse.ArgumentParser, flag: str, values: Sequence[str], choices) -> List[str]:
    """``values`` without repeats (order kept); a usage error names any not in ``choices``."""
    unknown = [v for v in values if v not in choices]
    if unknown:
        p.error(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(choices)}")
    return list(dict.fromkeys(values))


def check_seeds(p: argparse.ArgumentParser, seeds: Sequence[int]) -> None:
    if len(set(seeds)) != len(seeds):
        p.error(f"--seeds: repeated seed in {list(seeds)}")
    negative = [s for s in seeds if s < 0]
    if negative:
        p.error(f"--seeds must be >= 0 (detectron2 draws a random seed for a negative SEED), got {negative}")


def check_file(p: argparse.ArgumentParser, flag: str, path: str) -> None:
    if path and "://" not in path and not os.path.isfile(path):
        p.error(f"{flag}: no such file {path!r}")


def check_repo_root() -> None:
    from .setups import PLAIN_STUDENTS, QS

    """The run cache keys on repository-relative config paths: run from the root."""
    if not os.path.isfile(os.path.join(QS, os.path.basename(PLAIN_STUDENTS["GeneralizedRCNN"]))):
        raise SystemExit(f"run from the repository root ({ROOT}), as python -m benchmarks.<script>; "
                         f"the current folder is {os.getcwd()}")
