"""Symmetric matrix products on the CPU: the upper block triangle computed, the lower one mirrored.

Used by the Newton-Schulz engine (X·Xᵀ, A², the Gram form's m×m products) and the Kronecker factor
update (G·Gᵀ, Gᵀ·G). k row blocks of m/k compute (k+1)/2k of the dense FLOPs; the C++ kernel
fastopt::mirror_upper_ (csrc/cpu/symmetric_mirror.cpp) copies the upper triangle into the lower one
(torch's own transposed copy took longer than the products it saved). Callers check that the CPU extension
is built (``probe("cpu")``).
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
    blocks = symmetric_blocks(m)
    if blocks == 1:
        if bias is None and alpha == 1.0:
            return torch.mm(a, b, out=out)
        return torch.addmm(b.new_empty(m, m) if bias is None else bias, a, b, beta=beta, alpha=alpha, out=out)
    out = a.new_empty(m, m) if out is None else out
    bias = out if bias is None else bias  # beta 0: addmm ignores it
    rows = -(-m // blocks)
    for i in range(0, m, rows):
        torch.addmm(bias[i:i + rows, i:], a[i:i + rows], b[:, i:], beta=beta, alpha=alpha, out=out[i:i + rows, i:])
    torch.ops.fastopt.mirror_upper_(out)
    return out
