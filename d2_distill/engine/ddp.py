"""Multi-process training on CPU.

DefaultTrainer wraps the model with ``create_ddp_model(model)``, which always passes
``device_ids=[local_rank]``; PyTorch's DistributedDataParallel rejects device_ids
for a CPU module (ValueError), so stock DefaultTrainer cannot train with more than
one process on CPU (GLOO). DistillTrainer builds the same objects in the same order
as DefaultTrainer.__init__, but wraps with :func:`wrap_ddp`, which passes
``device_ids=None`` for CPU models (``tests/test_distributed.py`` trains with two
processes on CPU and checks that both end with identical weights).
"""
from __future__ import annotations

import detectron2.utils.comm as comm
from detectron2.engine import create_ddp_model
from torch import nn

__all__ = ["wrap_ddp"]


def wrap_ddp(model: nn.Module) -> nn.Module:
    """detectron2's ``create_ddp_model(model, broadcast_buffers=False)`` (a no-op for
    one process), with ``device_ids=None`` for CPU models, which DDP requires."""
    if comm.get_world_size() == 1:
        return model
    on_cpu = next(model.parameters()).device.type == "cpu"
    device_ids = None if on_cpu else [comm.get_local_rank()]
    return create_ddp_model(model, broadcast_buffers=False, device_ids=device_ids)
