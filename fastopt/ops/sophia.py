"""The fused Sophia (SophiaG) step: ``sophia_step(backend, ...)`` with the arguments of the op
``fastopt::sophia_step_`` (math: fastopt.reference.sophia; schema: csrc/fastopt.cpp). Dispatch as
in fastopt.ops.adam. The Hessian EMA is read, not written, by this op."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import reference
from ._dispatch import dispatch, triton_op


@triton_op("sophia_step_triton_", ("params", "exp_avgs", "exp_avg_scales", "master_params"))
def sophia_step_triton_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], hessians: list[Tensor],
                        exp_avg_scales: list[Tensor], hessian_scales: list[Tensor], master_params: list[Tensor],
                        lr_tensor: Optional[Tensor], lr: float, beta1: float, rho: float, bs: float,
                        weight_decay: float, maximize: bool, block_size: int, sr_seed: int,
                        grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    from ..triton_kernels.elementwise_step import sophia_step as launch

    launch(params, grads, exp_avgs, hessians, exp_avg_scales, hessian_scales, master_params, lr_tensor, lr, beta1,
           rho, bs, weight_decay, maximize, block_size, sr_seed, grad_scale, found_inf)


def sophia_step(backend: str, *args) -> None:
    dispatch(backend, reference.sophia_step, "sophia_step_", sophia_step_triton_, args)
