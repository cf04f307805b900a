"""Known third-party deprecation warnings, silenced at the lab's entry points.

detectron2 (upstream, April 2024) calls APIs that torch 2.14 deprecates; each
import, model build and traced forward repeats the warnings, which buried the
demo's own output under hundreds of lines. The filters below match each warning
by its message *and* the module it is attributed to, so nothing else is hidden:
d2_distill's own warnings, and any new warning of these libraries, still show.

Only entry points install them (the ``benchmarks`` package on import;
``train_net.py`` has the same lines); the library never changes the warning
filters of the program that imports it.
"""
from __future__ import annotations

import warnings

__all__ = ["KNOWN_WARNINGS", "silence_third_party_warnings"]

# (message regex, category, module regex): all three must match.
KNOWN_WARNINGS = (
    # detectron2's @torch.jit.script / script_if_tracing helpers
    (r"`torch\.jit\.script` is deprecated", FutureWarning, r"torch\.jit\._script"),
    # detectron2's anchor generator calls torch.meshgrid without indexing=
    (r"torch\.meshgrid: in an upcoming release", UserWarning, r"torch\.functional"),
)


def silence_third_party_warnings() -> None:
    """Ignore the warnings of :data:`KNOWN_WARNINGS` in this process (and the data
    loader workers it forks)."""
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
