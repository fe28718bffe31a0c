"""The fused Lion step: ``lion_step(backend, ...)`` with the arguments of the op
``fastopt::lion_step_`` (math: fastopt.reference.lion; schema: csrc/fastopt.cpp). Dispatch as
in fastopt.ops.adam."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import reference
from ._dispatch import dispatch, triton_op


@triton_op("lion_step_triton_", ("params", "exp_avgs", "exp_avg_scales", "master_params"))
def lion_step_triton_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_scales: list[Tensor],
                      master_params: list[Tensor], lr_tensor: Optional[Tensor], lr: float, beta1: float,
                      beta2: float, weight_decay: float, maximize: bool, cautious: bool, block_size: int,
                      sr_seed: int, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    from ..triton_kernels.elementwise_step import lion_step as launch

    launch(params, grads, exp_avgs, exp_avg_scales, master_params, lr_tensor, lr, beta1, beta2, weight_decay,
           maximize, cautious, block_size, sr_seed, grad_scale, found_inf)


def lion_step(backend: str, *args) -> None:
    dispatch(backend, reference.lion_step, "lion_step_", lion_step_triton_, args)
