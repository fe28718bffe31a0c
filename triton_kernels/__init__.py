"""Triton kernels of fastopt, installed as the sub-package ``fastopt.triton_kernels``.

Modules (import them explicitly; importing this package does not import Triton):

- ``elementwise_step``: the fused multi-tensor element-wise steps, AdamW / NAdamW
  (``fastopt::adam_step_`` contract) and Lion (``fastopt::lion_step_``), optionally cautious, one
  launch per call (two with cautious), with fp32 / bf16 / fp8 (e4m3fn + per-block scales) state.
"""
