"""The Newton-Schulz orthogonalisation of Muon, Scion and ROOT, in plain torch (fp64-capable).

For a matrix G (m, n), or each matrix of a batch (B, m, n): transpose so that m ≤ n, then

    X ← G / (‖G‖_F·scale + eps)
    for (a, b, c) in coefficients:  A = X·Xᵀ;  X ← a·X + (b·A + c·A²)·X

and transpose back. Each step maps every singular value σ of X to a·σ + b·σ³ + c·σ⁵, driving
them towards 1: the result approximates U·Vᵀ of G = U·S·Vᵀ. Math runs in ``dtype`` (the input's
by default; float64 for ground truth).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def newton_schulz(x: torch.Tensor, coefficients, eps: float, norm_scale: float = 1.0,
                  dtype: torch.dtype | None = None, norm: torch.Tensor | None = None) -> torch.Tensor:
    """The iteration above on a (m, n) or (B, m, n) tensor; ``coefficients``: one (a, b, c) per step;
    ``norm``: ‖G‖_F per matrix where the caller has it (else computed here)."""
    dtype = dtype or x.dtype
    wide = x.size(-2) <= x.size(-1)
    y = x if wide else x.mT
    # the norm in float64: the squares of huge fp32 entries would overflow in fp32
    if norm is None:
        norm = torch.linalg.vector_norm(y, dim=(-2, -1), dtype=torch.float64)
    norm = norm.double().view(*norm.shape, 1, 1)
    y = (y / (norm * norm_scale + eps)).to(dtype)
    for a, b, c in coefficients:
        gram = y @ y.mT
        y = a * y + (b * gram + c * gram @ gram) @ y
    return y if wide else y.mT
