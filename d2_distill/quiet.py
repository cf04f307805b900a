"""Known third-party deprecation warnings (and one torch log notice) of detectron2 on torch 2.14.

detectron2 (upstream, April 2024) calls APIs that torch 2.14 and setuptools
deprecate; its imports, model builds and traced forwards repeat the warnings,
which bury a training log under hundreds of lines. The filters below match each
warning by its message *and* the module it is attributed to, so nothing else is
hidden: d2_distill's own warnings, and any new warning of these libraries, still show.

* :func:`known_warnings_ignored` -- a context manager; ``import d2_distill`` runs
  its own imports of detectron2 inside it, so importing the package prints none
  of them. The program's warning filters are restored on exit: the library never
  changes them.
* :func:`silence_third_party_warnings` -- installs the filters for the rest of the
  process; called by entry points only (``train_net.py``, the lab's scripts).
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

__all__ = ["KNOWN_LOG_NOTICES", "KNOWN_WARNINGS", "known_warnings_ignored", "silence_third_party_warnings"]

# (message regex, category, module regex): all three must match.
KNOWN_WARNINGS = (
    # detectron2's @torch.jit.script / script_if_tracing helpers
    (r"`torch\.jit\.script` is deprecated", FutureWarning, r"torch\.jit\._script"),
    # detectron2's anchor generator calls torch.meshgrid without indexing=
    (r"torch\.meshgrid: in an upcoming release", UserWarning, r"torch\.functional"),
    # detectron2's model zoo imports pkg_resources (hence the setuptools<81 pin)
    (r"pkg_resources is deprecated as an API", UserWarning, r"detectron2\.model_zoo"),
)


# (logger name, message prefix): notices logged (not warned) by torch when detectron2
# calls its APIs. torch.fx logs "is_fx_tracing will return true ..." once per process,
# on the first model build, through its own logger (a glog-style ``W...`` line).
KNOWN_LOG_NOTICES = (
    ("torch.fx._symbolic_trace", "is_fx_tracing will return true for both fx.symbolic_trace and torch.export"),
)


class _DropKnownNotice(logging.Filter):
    """Drops the records of one logger whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _ignore_known() -> None:
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


@contextlib.contextmanager
def known_warnings_ignored() -> Iterator[None]:
    """The warnings of :data:`KNOWN_WARNINGS` are ignored inside the block; the
    warning filters are restored on exit."""
    with warnings.catch_warnings():
        _ignore_known()
        yield


def silence_third_party_warnings() -> None:
    """Ignore the warnings of :data:`KNOWN_WARNINGS` in this process (and the data
    loader workers it forks), and drop the log records of :data:`KNOWN_LOG_NOTICES`
    (only those: the same loggers' other records still show). Idempotent."""
    _ignore_known()
    for name, prefix in KNOWN_LOG_NOTICES:
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNotice) and f.prefix == prefix for f in log.filters):
            log.addFilter(_DropKnownNotice(prefix))
