"""Recorders: observe what a model computes, without editing its code path.

A :class:`Recorder` attaches to named parts of a model and keeps what they
produce during one forward pass:

* ``record_output(key, "backbone")``: a forward hook; keeps the module's output;
* ``record_return(key, "roi_heads", "label_and_sample_proposals")``: wraps one
  bound method of one instance; keeps its return value. An optional
  ``transform_args`` may rewrite the call's arguments (used by TAR's
  ``PROPOSALS: both`` to add teacher proposals); without it the call is untouched.

Recording is off unless inside ``with recorder.recording() as records:``, so an
eval-mode forward costs nothing and keeps nothing. Records are dropped when the
block ends, so no activations outlive the step.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from torch import nn

__all__ = ["Recorder"]


class Recorder:
    def __init__(self, model: nn.Module):
        self.model = model
        self.records: Dict[str, Any] = {}
        self._active = False
        self._undo: List[Callable[[], None]] = []

    # ---- attaching ---------------------------------------------------------
    def _module(self, path: str) -> nn.Module:
        try:
            return self.model.get_submodule(path) if path else self.model
        except AttributeError as e:
            raise ValueError(
                f"cannot record {path!r}: {type(self.model).__name__} has no such submodule"
            ) from e

    def record_output(self, key: str, path: str) -> None:
        def hook(_module, _inputs, output):
            if self._active:
                self.records[key] = output

        handle = self._module(path).register_forward_hook(hook)
        self._undo.append(handle.remove)

    def record_return(
        self,
        key: str,
        path: str,
        method: str,
        transform_args: Optional[Callable[[Tuple, Dict], Tuple[Tuple, Dict]]] = None,
    ) -> None:
        owner = self._module(path)
        original = getattr(owner, method, None)
        if original is None or not callable(original):
            raise ValueError(f"cannot record {path}.{method}: {type(owner).__name__} has no such method")

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            if not self._active:
                return original(*args, **kwargs)
            if transform_args is not None:
                args, kwargs = transform_args(args, kwargs)
            out = original(*args, **kwargs)
            self.records[key] = out
            return out

        owner.__dict__[method] = wrapper  # instance attribute shadows the class method
        self._undo.append(lambda: owner.__dict__.pop(method, None))

    def remove(self) -> None:
        """Detach every hook and wrapper (the model is as it was before)."""
        while self._undo:
            self._undo.pop()()

    # ---- recording ---------------------------------------------------------
    @contextlib.contextmanager
    def recording(self) -> Iterator[Dict[str, Any]]:
        self.records = {}
        self._active = True
        try:
            yield self.records
        finally:
            self._active = False
            self.records = {}
