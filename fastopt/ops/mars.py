"""The fused MARS-AdamW step: ``mars_step(backend, ...)`` with the arguments of the op
``fastopt::mars_step_`` (math: fastopt.reference.mars; schema: csrc/fastopt.cpp). Dispatch as
in fastopt.ops.adam."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import reference
from ._dispatch import dispatch, triton_op

_MUTATED = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "last_grads", "exp_avg_scales",
            "exp_avg_sq_scales", "max_exp_avg_sq_scales", "last_grad_scales", "master_params")


@triton_op("mars_step_triton_", _MUTATED)
def mars_step_triton_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                      max_exp_avg_sqs: list[Tensor], last_grads: list[Tensor], exp_avg_scales: list[Tensor],
                      exp_avg_sq_scales: list[Tensor], max_exp_avg_sq_scales: list[Tensor],
                      last_grad_scales: list[Tensor], master_params: list[Tensor], state_steps: list[Tensor],
                      lr_tensor: Optional[Tensor], lr: float, beta1: float, beta2: float, eps: float,
                      weight_decay: float, gamma: float, maximize: bool, cautious: bool, block_size: int,
                      sr_seed: int, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    from ..triton_kernels.elementwise_step import mars_step as launch

    launch(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, last_grads, exp_avg_scales, exp_avg_sq_scales,
           max_exp_avg_sq_scales, last_grad_scales, master_params, state_steps, lr_tensor, lr, beta1, beta2, eps,
           weight_decay, gamma, maximize, cautious, block_size, sr_seed, grad_scale, found_inf)


def mars_step(backend: str, *args) -> None:
    dispatch(backend, reference.mars_step, "mars_step_", mars_step_triton_, args)
