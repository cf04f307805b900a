"""Mixed precision on CPU: ``SOLVER.AMP.ENABLED`` trains with bfloat16 autocast.

detectron2's ``AMPTrainer`` is CUDA-only (float16 autocast with a gradient
scaler; it asserts CUDA at its first step). On a CPU whose oneDNN has native
bfloat16 arithmetic (AVX512-BF16 or AMX: recent Xeon and EPYC), bfloat16
convolutions run about twice as fast as float32 ones, and a detector's training
step is mostly convolutions. :class:`CPUAutocastTrainer` is detectron2's
``SimpleTrainer`` step with the forward pass (the model's losses, and a
distiller's teacher forward) under ``torch.autocast("cpu", torch.bfloat16)``:

* the backward pass and the optimizer step run outside autocast, as PyTorch
  recommends; parameters, gradients and optimizer state stay float32;
* bfloat16 has float32's exponent range, so no gradient scaler is needed;
* evaluation is not affected: ``DefaultTrainer.test`` runs in float32.

On a CPU without native bfloat16 the same code works but is emulated and slower
than float32; ``DistillTrainer`` warns then (:func:`warn_if_emulated`). On CUDA, ``SOLVER.AMP.ENABLED``
keeps detectron2's own ``AMPTrainer``.
"""
from __future__ import annotations

import functools
import logging
import time

import torch
from detectron2.engine import SimpleTrainer

__all__ = ["CPUAutocastTrainer", "cpu_has_native_bf16", "warn_if_emulated"]


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs oneDNN's bfloat16 kernels natively (AVX512-BF16 / AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the query
        return False


class CPUAutocastTrainer(SimpleTrainer):
    """``SimpleTrainer`` whose forward pass runs under CPU bfloat16 autocast."""

    def run_step(self):
        assert self.model.training, "[CPUAutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                loss_dict = {"total_loss": loss_dict}
            losses = sum(loss_dict.values())
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        losses.backward()
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


def warn_if_emulated() -> None:
    """Warn (once per call) when CPU autocast would run emulated bfloat16."""
    if not cpu_has_native_bf16():
        logging.getLogger("d2_distill").warning(
            "SOLVER.AMP.ENABLED on CPU trains with bfloat16 autocast, but this CPU has no native bfloat16 "
            "(AVX512-BF16 or AMX): it will be slower than float32. Set SOLVER.AMP.ENABLED False here."
        )
