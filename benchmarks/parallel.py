"""Training several lab runs at once, each in its own process (``--jobs N``)."""
from __future__ import annotations

import os
import sys
from typing import List, Sequence

from .setups import row_opts, run_folder

__all__ = ["train_parallel", "cpu_cores"]


def _train_in_worker(threads: int, quiet: bool, config: str, opts: List[str], folder: str, output: str) -> str:
    """One run in a worker process of :func:`train_parallel`, with ``threads`` torch
    threads; ``quiet``: the console as the demo's (:func:`benchmarks.runs.console_and_log`),
    the whole log in the run folder's ``log.txt``."""
    import contextlib

    import torch

    from .runs import console_and_log, setup_logging, train_and_evaluate

    torch.set_num_threads(threads)
    setup_logging()  # console_and_log filters the handlers this installs
    with console_and_log(os.path.join(folder, "log.txt")) if quiet else contextlib.nullcontext():
        train_and_evaluate(config, opts, folder, twins_under=output)
    return folder


def _die_with_parent(parent: int) -> None:
    """Initializer of :func:`train_parallel`'s workers: on Linux, ask the kernel to
    send this worker SIGTERM when the process that started it exits, however it
    exits. Without it a ``kill`` of the benchmark alone (SIGTERM or SIGKILL to its
    pid, not its process group, as a job queue or a timeout does) leaves the workers
    training on, unseen, into run folders that a rerun then trains into as well.
    (Ctrl-C reaches the whole process group and needs none of this.)"""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def train_parallel(work: Sequence[tuple], jobs: int, quiet: bool = False, threads: int = 0) -> None:
    """Train the runs of ``work`` (``(row, output, iters, seed, teacher, extra)``, the
    arguments of :func:`train_row`) ``jobs`` at a time, each in its own process with
    ``threads`` torch threads (0: ``cores // jobs``); finished runs are reused there as everywhere.
    The callers then read every record through :func:`train_row` (cached by then).
    ``quiet``: each worker's console shows progress and warnings only, its whole log
    going to the run folder's ``log.txt`` (the demo's console).
    ``jobs <= 1`` does nothing: ``train_row`` trains in this process. A run that fails
    stops the runs not yet started and raises; the finished ones stay cached. The
    workers end with this process, even when it is killed (:func:`_die_with_parent`).

    Why: a CPU training step does not scale linearly with threads, so on 2 cores two
    one-thread runs side by side finish more runs per hour than one two-thread run."""
    if jobs <= 1 or not work:
        return
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    threads = threads or max(1, cpu_cores() // jobs)
    tasks = [(row.config, row_opts(row, iters, seed, teacher, extra), run_folder(output, row, iters, seed), output)
             for row, output, iters, seed, teacher, extra in work]
    seen, unique = set(), []
    for t in tasks:  # two rows with one folder (a restated default) train once
        if t[2] not in seen:
            seen.add(t[2])
            unique.append(t)
    with ProcessPoolExecutor(min(jobs, len(unique)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(_train_in_worker, threads, quiet, *t): t[2] for t in unique}
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for f in pending:
            f.cancel()
        for f in done:
            if f.exception() is not None:
                raise RuntimeError(f"training {futures[f]} failed: {f.exception()!r}") from f.exception()
