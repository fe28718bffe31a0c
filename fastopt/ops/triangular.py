"""Products with upper-triangular matrices on the CPU, blocked so the zero triangle is skipped.

PSGD Kron's factors Q are upper triangular (n, n); its step multiplies by Q, by Qᵀ, by QᵀQ, and forms triu(T)·Q.
Split into k blocks of n/k columns (or rows), each block product reads only the part of Q that is not zero:

    x·Q       column block j: x[:, :end_j] · Q[:end_j, block_j]              (k+1)/2k of the dense FLOPs
    x·Qᵀ      column block j: x[:, start_j:] · Q[block_j, start_j:]ᵀ         (k+1)/2k
    QᵀQ       row block i of the upper half: Q[:end_i, block_i]ᵀ · Q[:end_i, start_i:], mirrored    0.26 at k = 6
    triu(U)·Q (the result is upper): row block i: U[block_i, start_i:] · Q[start_i:, start_i:], itself an x·Q,
              written over U                                                0.23 at n = 2048–3072

x·QᵀQ is the two blocked products (x·Qᵀ)·Q, or for x of 3n rows or more one dense product with P = QᵀQ: the blocks
run below the dense matmul rate (~265 against ~330 GFLOP/s for a 3072×768 x here), and from 3n rows the dense
product plus P costs less at every size timed (a 2-core Intel Xeon, medians of 5: n = 768, 3072 rows 15.4 → 12.2
ms, 2304 rows 11.4 → 9.5; n = 2048, 6144 rows 235 → 192; n = 3072, 9216 rows 714 → 613; at n rows, n = 768, P
costs about what the dense product saves).

Every function takes (n, n) matrices or (B, n, n) stacks (x: (…, r, n)); below ``TRIANGULAR_MIN_N`` one dense
product is faster than the blocks and is what they run. ``gram`` (x·xᵀ) computes one symmetric half of a
large matrix (fastopt.ops.symmetric) or of each matrix of a batch.
"""

from __future__ import annotations

import torch

from .symmetric import symmetric_blocks, symmetric_mm

TRIANGULAR_MIN_N = 512
GRAM_FORM_MIN_ROWS = 3


def triangular_blocks(n: int) -> int:
    """Column (or row) blocks for an n-wide triangular product (1: one dense product): blocks of ~128, at most 8
    (measured here against 256-wide blocks: x·Q at n = 512 and 768 8-13% faster, 3072 unchanged)."""
    return 1 if n < TRIANGULAR_MIN_N else min(8, n // 128)


def _bounds(n: int):
    size = -(-n // triangular_blocks(n))
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def mm_upper(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x·q for an upper-triangular q, in x's layout (see _blocked)."""
    return _blocked(x, q, upper_t=False)


def mm_upper_t(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x·qᵀ for an upper-triangular q, in x's layout (see _blocked)."""
    return _blocked(x, q, upper_t=True)


def _blocked(x: torch.Tensor, q: torch.Tensor, upper_t: bool) -> torch.Tensor:
    """x·q (x·qᵀ with ``upper_t``) by column blocks of the result, each reading only q's non-zero part. The result
    keeps x's layout: row-major, or column-major where x is (a mode-d unfolding's transposed view), so a chain of
    products along the dimensions of a tensor ends in the tensor's own layout and the element-wise work after it
    runs on contiguous memory. Column blocks of a row-major result (and row blocks of a column-major one) are
    strided matrices that BLAS writes in place (matmul's ``out``, no copies)."""
    n = q.shape[-1]
    if triangular_blocks(n) == 1:
        return x @ (q.mT if upper_t else q)
    out = x.new_empty(*x.shape[:-2], n, x.shape[-2]).mT if _column_major(x) else torch.empty_like(
        x, memory_format=torch.contiguous_format)
    for start, end in _bounds(n):
        if upper_t:  # block j = x[:, start_j:] · q[block_j, start_j:]ᵀ
            torch.matmul(x[..., start:], q[..., start:end, start:].mT, out=out[..., start:end])
        else:  # block j = x[:, :end_j] · q[:end_j, block_j]
            torch.matmul(x[..., :end], q[..., :end, start:end], out=out[..., start:end])
    return out


def mm_gram_upper(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x·qᵀq for an upper-triangular q, in x's layout: for x of at least ``GRAM_FORM_MIN_ROWS``·n rows, one dense
    product with P = qᵀq (upper_gram), else the two blocked products (x·qᵀ)·q."""
    n = q.shape[-1]
    if triangular_blocks(n) == 1 or x.shape[-2] < GRAM_FORM_MIN_ROWS * n:
        return mm_upper(mm_upper_t(x, q), q)
    p = upper_gram(q)
    return (p @ x.mT).mT if _column_major(x) else x @ p  # P is symmetric: (x·P)ᵀ = P·xᵀ


def upper_gram(q: torch.Tensor) -> torch.Tensor:
    """qᵀq for an upper-triangular q (n, n) or stack (B, n, n): row block i of its upper block triangle is
    q[:end_i, block_i]ᵀ · q[:end_i, start_i:] (q's rows below end_i are zero in block i), k(k+1)(k+2)/6k³ of the
    dense FLOPs (0.26 for k = 6), the rest mirrored (fastopt::mirror_upper_)."""
    n = q.shape[-1]
    if triangular_blocks(n) == 1:
        return q.mT @ q
    out = q.new_empty(q.shape)
    for start, end in _bounds(n):
        torch.matmul(q[..., :end, start:end].mT, q[..., :end, start:], out=out[..., start:end, start:])
    for matrix in out.view(-1, n, n):
        torch.ops.fastopt.mirror_upper_(matrix)
    return out


def _column_major(x: torch.Tensor) -> bool:
    return x.mT.is_contiguous() and not x.is_contiguous()


def upper_mm_upper(u: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """triu(u)·q for an upper-triangular q (the result is upper triangular; u's strictly lower part is ignored),
    written over u: row block i of the result is u[block_i, start_i:] · q[start_i:, start_i:] with the block's
    diagonal square made upper triangular, a product with an upper-triangular matrix again (mm_upper), so both
    zero triangles are skipped (u's lower part is only written, zeros: no separate triu pass); it needs only u's
    same rows, so no n×n buffer is allocated (a fresh one costs page faults here)."""
    n = q.shape[-1]
    if triangular_blocks(n) == 1:
        return u.triu_() @ q
    for start, end in _bounds(n):
        u[..., start:end, :start].zero_()
        u[..., start:end, start:end].triu_()
        u[..., start:end, start:] = mm_upper(u[..., start:end, start:], q[..., start:, start:])
    return u


def gram(x: torch.Tensor) -> torch.Tensor:
    """x·xᵀ for x (…, n, r) of n ≥ 512, one matrix or a batch: each matrix's upper block triangle computed, mirrored
    (fastopt.ops.symmetric)."""
    n = x.shape[-2]
    if symmetric_blocks(n, x.dtype) == 1:
        return x @ x.mT
    out = x.new_empty(*x.shape[:-1], n)
    for matrix, result in zip(x.reshape(-1, n, x.shape[-1]), out.view(-1, n, n)):
        symmetric_mm(matrix, matrix.mT, out=result)
    return out
