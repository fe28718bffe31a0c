"""The momentum pass of the orthogonalized optimizers (Muon, Scion, ROOT) on the triton backend:
``momentum_direction_triton_``, the list form of the CPU op ``fastopt::momentum_direction_``
(csrc/cpu/matrix_elementwise.cpp), one launch for n tensors:

    B ← β·B + γ·g in place;   M = δ·g + ε·B (the new B);   sumsqs[i] = Σ M² of tensor i (float64)

B float32, bfloat16 or fp8 e4m3 with one float32 scale per block of ``block_size`` (``buf_scales``); g float32,
bfloat16 or float16; M float32 or bfloat16. The kernel: fastopt.triton_kernels.elementwise_step.
"""

from __future__ import annotations

from torch import Tensor

from ._dispatch import triton_op


@triton_op("momentum_direction_triton_", ("bufs", "buf_scales", "directions", "sumsqs"))
def momentum_direction_triton_(bufs: list[Tensor], buf_scales: list[Tensor], block_size: int, grads: list[Tensor],
                               directions: list[Tensor], sumsqs: Tensor, beta: float, gamma: float, delta: float,
                               epsilon: float) -> None:
    from ..triton_kernels.elementwise_step import momentum_direction as launch

    launch(bufs, buf_scales, block_size, grads, directions, sumsqs, beta, gamma, delta, epsilon)
