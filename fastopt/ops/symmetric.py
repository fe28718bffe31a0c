"""Symmetric matrix products on the CPU: the upper block triangle computed, the lower one mirrored.

Used by the Newton-Schulz engine (X·Xᵀ, A², the Gram form's m×m products) and the Kronecker factor
update (G·Gᵀ, Gᵀ·G). k row blocks of m/k compute (k+1)/2k of the dense FLOPs. Measured on a 2-core
Zen 4 in bf16 against one torch.mm: 1.1x at m = 512 (k = 2), 1.3x at 768 (3), 1.4x at 2048 (4);
k = 8 at 2048 and 3072 (the K = 768 products of a 768-wide model) took 5% less time than k = 4 in
fp32 and bf16 (more blocks gained nothing further); below 512 the smaller products run slower than the
one big one, so they stay dense.
"""

from __future__ import annotations

import torch


def symmetric_blocks(m: int) -> int:
    """Row blocks for an m×m symmetric product (1: one dense product)."""
    return 1 if m < 512 else min(8, m // 256)


def symmetric_mm(a, b, bias=None, beta: float = 0.0, alpha: float = 1.0, out=None) -> torch.Tensor:
    """a·b, or beta·bias + alpha·a·b, for an (m, m) result known to be symmetric (and a symmetric bias).
    ``out`` may be ``bias`` (an in-place update: each block reads only the part of bias it writes)."""
    m = a.size(0)
    out = a.new_empty(m, m) if out is None else out
    bias = out if bias is None else bias  # beta 0: addmm ignores it
    rows = -(-m // symmetric_blocks(m))
    for i in range(0, m, rows):
        block = out[i:i + rows, i:]
        torch.addmm(bias[i:i + rows, i:], a[i:i + rows], b[:, i:], beta=beta, alpha=alpha, out=block)
    for i in range(rows, m, rows):
        out[i:i + rows, :i] = out[:i, i:i + rows].mT
    return out
