"""Triton kernels of fastopt, installed as the sub-package ``fastopt.triton_kernels``.

Modules (import them explicitly; importing this package does not import Triton):

- ``elementwise_step``: the fused multi-tensor element-wise steps, AdamW / NAdamW
  (``fastopt::adam_step_`` contract) and Lion (``fastopt::lion_step_``), optionally cautious, one
  launch per call (two with cautious), with fp32 / bf16 / fp8 (e4m3fn + per-block scales) state; and the momentum
  pass of Muon, Scion and ROOT (list form of ``fastopt::momentum_direction_``) on the same loads and stores.
- ``select``: exact order statistics of |x| per matrix by radix select (11-bit digits, batched over the matrices),
  and ROOT's quantile clamp built on them, clamp(x, ±(quantile(|x|, q) + offset)) (the triton backend of
  ``fastopt.ops.clamp_to_quantile``): P + 1 launches (P = 3 digits for fp32, 2 for bf16 / fp16), no host sync.
- ``newton_schulz``: the Newton-Schulz iteration of Muon, Scion and ROOT on a (B, m, n) batch
  (``backend="triton"`` of ``fastopt.ops.newton_schulz``): per step a symmetric product kernel
  computing the upper tile triangle of X·Xᵀ, the same kernel for b·A + c·A·A (bias fused), and
  P·X + a·X, each one launch over the batch; bf16 operands with fp32 accumulation, or fp32.
"""
