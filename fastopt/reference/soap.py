"""SOAP (Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam", nikhilvyas/SOAP) in plain
torch, fp64-capable: Adam run in the eigenbasis of Shampoo's preconditioner, for one tensor.

Per dimension d of the gradient G that is at most ``max_precond_dim`` (1-D tensors only with
``precondition_1d``), a factor F_d (the EMA of G contracted with itself over all other dimensions; for a
matrix L = EMA(G·Gᵀ) and R = EMA(Gᵀ·G)) and its eigenbasis Q_d; other dimensions stay unrotated.
``project`` rotates every dimension into its basis (a matrix: Q_Lᵀ·G·Q_R), ``project_back`` undoes it.

* First call: the factors take the gradient (F ← β_s·0 + (1−β_s)·…), Q_d = the eigenvectors of F_d + 1e-30·I
  in descending eigenvalue order (``eigh`` in the factor's dtype, float64 if that fails); no update.
* Every later call, t = 1, 2, … (the call's number minus one):

      m ← β1·m + (1−β1)·G                      (first moment, original space)
      v ← β2·v + (1−β2)·project(G)²            (second moment, eigenbasis)
      u = project_back(project(m) / (√v + ε));  u ← u / (1e-30 + rms(u)) with ``normalize_grads``
      p ← p − η·√(1−β2ᵗ)/(1−β1ᵗ)·u  (η alone without ``correct_bias``);  p ← p − η·λ·p
      F_d ← β_s·F_d + (1−β_s)·(G contracted over the other dimensions)
      every ``precondition_frequency`` steps, per d: P = F_d·Q_d, the columns sorted by the estimated
      eigenvalues diag(Q_dᵀ·P) (descending), v permuted along d to match, Q_d ← the Q of the QR of P.
"""

from __future__ import annotations

import math

import torch


def _preconditioned_dims(grad: torch.Tensor, max_precond_dim: int, precondition_1d: bool) -> list[bool]:
    if grad.ndim == 1 and not precondition_1d:
        return [False]
    return [size <= max_precond_dim for size in grad.shape]


def _contract(grad: torch.Tensor, dim: int) -> torch.Tensor:
    """G contracted with itself over every dimension but ``dim``: (size, size) (a vector: its outer product)."""
    others = [d for d in range(grad.ndim) if d != dim]
    return torch.tensordot(grad, grad, dims=[others, others])


def project(x: torch.Tensor, bases: list, back: bool = False) -> torch.Tensor:
    """x with every dimension d rotated by Q_d (forward: Q_dᵀ along d; back: Q_d); None: unrotated."""
    for q in bases:  # each pass consumes dimension 0 and appends the rotated one last
        x = x.movedim(0, -1) if q is None else torch.tensordot(x, q, dims=[[0], [1 if back else 0]])
    return x


def _eigenbasis(factor: torch.Tensor) -> torch.Tensor:
    shifted = factor + 1e-30 * torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
    try:
        _, vectors = torch.linalg.eigh(shifted)
    except RuntimeError:  # eigh fails on some ill-conditioned fp32 inputs: retry in float64
        _, vectors = torch.linalg.eigh(shifted.double())
        vectors = vectors.to(factor.dtype)
    return vectors.flip(1)  # descending eigenvalues


def update_factors(grad: torch.Tensor, factors: list, shampoo_beta: float) -> None:
    """F_d ← β_s·F_d + (1−β_s)·(G contracted over the other dimensions), for every factor that is not None."""
    for d, factor in enumerate(factors):
        if factor is not None:
            factor.lerp_(_contract(grad, d), 1 - shampoo_beta)


def _refresh_bases(state) -> None:
    """One power iteration and QR per factor; the second moment permuted to the new column order."""
    exp_avg_sq = state["exp_avg_sq"]
    for d, (factor, q) in enumerate(zip(state["GG"], state["Q"])):
        if factor is None:
            continue
        power = factor @ q
        order = torch.argsort((q * power).sum(0), descending=True)
        exp_avg_sq = exp_avg_sq.index_select(d, order)
        state["Q"][d] = torch.linalg.qr(power[:, order])[0]
    state["exp_avg_sq"] = exp_avg_sq


@torch.no_grad()
def soap_step(p: torch.Tensor, grad: torch.Tensor, state: dict, step: int, *, lr: float, betas=(0.95, 0.95),
              shampoo_beta: float | None = None, eps: float = 1e-8, weight_decay: float = 0.01,
              precondition_frequency: int = 10, max_precond_dim: int = 10000, precondition_1d: bool = False,
              correct_bias: bool = True, normalize_grads: bool = False, factor_update=update_factors) -> None:
    """One SOAP step on ``p`` in place (see the module docstring). ``step``: this call's number, from 1 (the
    first only builds the bases, so t = step − 1); ``state`` starts as {} (or with zero moments) and holds
    "exp_avg", "exp_avg_sq", "GG" and "Q" (one entry per dimension, None where unrotated);
    ``factor_update(grad, factors, shampoo_beta)`` is the factor EMA (a kernel may stand in)."""
    beta1, beta2 = betas
    shampoo_beta = beta2 if shampoo_beta is None else shampoo_beta
    if "Q" not in state:
        state.setdefault("exp_avg", torch.zeros_like(grad))
        state.setdefault("exp_avg_sq", torch.zeros_like(grad))
        state["GG"] = [torch.zeros(n, n, dtype=grad.dtype, device=grad.device) if keep else None
                       for n, keep in zip(grad.shape, _preconditioned_dims(grad, max_precond_dim, precondition_1d))]
        factor_update(grad, state["GG"], shampoo_beta)
        state["Q"] = [None if f is None else _eigenbasis(f) for f in state["GG"]]
        return  # the first gradient only builds the bases: it is never projected with itself
    t = step - 1
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].lerp_(project(grad, state["Q"]).square(), 1 - beta2)
    update = project(project(state["exp_avg"], state["Q"]) / (state["exp_avg_sq"].sqrt() + eps), state["Q"],
                     back=True)
    if normalize_grads:
        update = update / (1e-30 + update.square().mean().sqrt())
    step_size = lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t) if correct_bias else lr
    p.add_(update, alpha=-step_size)
    if weight_decay:
        p.add_(p, alpha=-lr * weight_decay)
    factor_update(grad, state["GG"], shampoo_beta)
    if t % precondition_frequency == 0:
        _refresh_bases(state)
