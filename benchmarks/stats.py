"""The lab's statistics over seeds and how its tables are written (JSON, numbers)."""
from __future__ import annotations

import math
import os
import statistics
from typing import Optional, Sequence

__all__ = ["mean_sd", "gap_closed", "fmt", "json_safe", "report", "write_json"]


def mean_sd(values: Sequence[Optional[float]]):
    """(mean, sample standard deviation) over seeds; sd is 0 for one value; NaN if any is missing."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if len(vals) != len(values) or not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def gap_closed(row: float, plain: float, teacher: float) -> float:
    """(row − plain) / (teacher − plain) in %: the share of the teacher–student gap a
    distilled student closes; NaN when the teacher is not above the plain student."""
    gap = teacher - plain
    return 100.0 * (row - plain) / gap if gap > 0 else float("nan")


def fmt(v: Optional[float], signed: bool = False, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def json_safe(x):
    """NaN/inf -> None, so the file is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def report(path: str, summary, table: str) -> None:
    """What a lab script ends with: ``summary`` as strict JSON to ``path``, then its
    markdown ``table`` and where the JSON went on stdout."""
    write_json(path, summary)
    print(table)
    print(f"\nwritten {path}")


def write_json(path: str, obj) -> None:
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(json_safe(obj), f, indent=1)
