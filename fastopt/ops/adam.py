"""The Adam-family fused step: ``adam_step(backend, ...)`` with the arguments of the op
``fastopt::adam_step_`` (see fastopt.reference.adam for the math and csrc/fastopt.cpp for
the schema). The cpu and cuda backends are the C++ op; triton is a Python op of the same
signature (fastopt.ops._dispatch.triton_op); both are opaque to torch.compile (fake implementations
registered by triton_op and fastopt.ops.register_native_fake).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import reference
from ._dispatch import dispatch, triton_op

_MUTATED = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "exp_avg_scales", "exp_avg_sq_scales",
            "max_exp_avg_sq_scales", "master_params")


@triton_op("adam_step_triton_", _MUTATED)
def adam_step_triton_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                      exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], exp_avg_scales: list[Tensor],
                      exp_avg_sq_scales: list[Tensor], max_exp_avg_sq_scales: list[Tensor],
                      master_params: list[Tensor], state_steps: list[Tensor], lr_tensor: Optional[Tensor],
                      lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, nesterov: bool,
                      maximize: bool, cautious: bool, block_size: int, sr_seed: int, grad_scale: Optional[Tensor],
                      found_inf: Optional[Tensor]) -> None:
    from ..triton_kernels.elementwise_step import adam_step as launch

    launch(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales,
           max_exp_avg_sq_scales, master_params, state_steps, lr_tensor, lr, beta1, beta2, eps, weight_decay,
           nesterov, maximize, cautious, block_size, sr_seed, grad_scale, found_inf)


def adam_step(backend: str, *args) -> None:
    dispatch(backend, reference.adam_step, "adam_step_", adam_step_triton_, args)
