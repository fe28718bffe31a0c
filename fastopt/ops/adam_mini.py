"""The fused element-wise half of Adam-mini: ``adam_mini_step(backend, ...)`` with the arguments of
the op ``fastopt::adam_mini_step_`` (math: fastopt.reference.adam_mini; schema: csrc/fastopt.cpp).
Dispatch as in fastopt.ops.adam. The per-segment step sizes are read, not written."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import reference
from ._dispatch import dispatch, triton_op


@triton_op("adam_mini_step_triton_", ("params", "exp_avgs", "exp_avg_scales", "master_params"))
def adam_mini_step_triton_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                           exp_avg_scales: list[Tensor], step_sizes: list[Tensor], segment_lengths: list[int],
                           master_params: list[Tensor], lr_tensor: Optional[Tensor], lr: float, beta1: float,
                           weight_decay: float, maximize: bool, block_size: int, sr_seed: int,
                           grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    from ..triton_kernels.elementwise_step import adam_mini_step as launch

    launch(params, grads, exp_avgs, exp_avg_scales, step_sizes, segment_lengths, master_params, lr_tensor, lr, beta1,
           weight_decay, maximize, block_size, sr_seed, grad_scale, found_inf)


def adam_mini_step(backend: str, *args) -> None:
    dispatch(backend, reference.adam_mini_step, "adam_mini_step_", adam_mini_step_triton_, args)
