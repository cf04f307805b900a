"""Distillation weight schedules r(t) in [0, 1]: every distillation loss is
multiplied by r(t) times its own weight. A function of the iteration only, so it
survives ``--resume``."""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SCHEDULE_KINDS", "schedule_factor", "DistillSchedule"]

SCHEDULE_KINDS = ("linear", "step", "cosine", "constant")


def schedule_factor(
    kind: str,
    it: int,
    max_iter: int,
    *,
    warmup_iters: int = 0,
    iters_per_epoch: int = 0,
) -> float:
    """Distillation-weight schedule factor r(t) in [0, 1] (a Python float).

    With t = ``it`` and T = ``max_iter``:

    * ``"linear"``:   r = 1 - t / T
    * ``"step"``:     r = 1 - floor(t / I) / E, I = ``iters_per_epoch`` (> 0),
      E = ceil(T / I): constant within an epoch, one step down per epoch.
    * ``"cosine"``:   r = 0.5 * (1 + cos(pi * t / T))
    * ``"constant"``: r = 1

    Past the end (t > T) the decaying kinds give 0 (``"constant"`` stays 1).
    If ``warmup_iters`` > 0, r is multiplied by min(1, t / warmup_iters).
    The result is clamped to [0, 1] (so t < 0 behaves like t = 0 for decay).

    Raises:
        ValueError: unknown ``kind`` (valid: :data:`SCHEDULE_KINDS`),
            ``max_iter`` <= 0, ``warmup_iters`` < 0, or ``kind == "step"``
            with ``iters_per_epoch`` <= 0.
    """
    if kind not in SCHEDULE_KINDS:
        raise ValueError(
            f"unknown schedule kind {kind!r}; valid kinds are: {', '.join(SCHEDULE_KINDS)}"
        )
    if max_iter <= 0:
        raise ValueError(f"max_iter must be > 0, got {max_iter!r}")
    if warmup_iters < 0:
        raise ValueError(f"warmup_iters must be >= 0, got {warmup_iters!r}")
    if kind == "step" and iters_per_epoch <= 0:
        raise ValueError(
            f"schedule kind 'step' needs iters_per_epoch > 0, got iters_per_epoch={iters_per_epoch!r}"
        )

    t = max(float(it), 0.0)
    T = float(max_iter)

    if kind == "constant":
        r = 1.0
    elif t > T:
        r = 0.0
    elif kind == "linear":
        r = 1.0 - t / T
    elif kind == "cosine":
        r = 0.5 * (1.0 + math.cos(math.pi * t / T))
    else:  # step
        ipe = int(iters_per_epoch)
        num_epochs = math.ceil(max_iter / ipe)
        r = 1.0 - (int(t) // ipe) / num_epochs

    if warmup_iters > 0:
        r *= min(1.0, t / float(warmup_iters))
    return float(min(max(r, 0.0), 1.0))


@dataclass(frozen=True)
class DistillSchedule:
    """A schedule with its options bound: ``schedule(it) -> r``. See :func:`schedule_factor`."""

    kind: str
    max_iter: int
    warmup_iters: int = 0
    iters_per_epoch: int = 0

    def __post_init__(self):
        schedule_factor(self.kind, 0, self.max_iter, warmup_iters=self.warmup_iters,
                        iters_per_epoch=self.iters_per_epoch)  # validates the options now

    def __call__(self, it: int) -> float:
        return schedule_factor(self.kind, it, self.max_iter, warmup_iters=self.warmup_iters,
                               iters_per_epoch=self.iters_per_epoch)
