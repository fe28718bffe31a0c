"""Triton kernels of fastopt, installed as the sub-package ``fastopt.triton_kernels``.

Modules (import them explicitly; importing this package does not import Triton):

- ``adam_step``: the fused multi-tensor AdamW / NAdamW step (``fastopt::adam_step_`` contract),
  one launch per call, with fp32 / bf16 / fp8 (e4m3fn + per-block scales) state.
"""
