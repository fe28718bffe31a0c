"""Sophia (Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for Language
Model Pre-training"), the SophiaG step of ``Liuhong99/Sophia``, one tensor at a time.

With g the (unscaled, possibly negated) gradient and h the EMA of diagonal Hessian estimates
(read here, written by ``sophia_hessian_update``):

    m ← β1·m + (1 − β1)·g
    u = lr · sign(m) · min(|m| / (max(ρ·bs·h, 0) + 1e-15), 1)
    p ← p·(1 − lr·wd) − u

For h ≥ 0 (the Gauss-Newton-Bartlett estimator: h is an EMA of squares) this is the official
``|m| / (ρ·bs·h + 1e-15)``; a negative h (Hutchinson estimates may be negative) gives the
clipped step lr·sign(m), as the paper's max(γ·h, ε) does. Math runs in float32, or float64
for float64 tensors.
"""

from __future__ import annotations

import torch

from .moments import load, store
from .update import apply_update, compute_dtype, effective_grad


@torch.no_grad()
def sophia_step(params, grads, exp_avgs, hessians, exp_avg_scales, hessian_scales, master_params, lr_tensor, lr,
                beta1, rho, bs, weight_decay, maximize, block_size, sr_seed, grad_scale, found_inf) -> None:
    if found_inf is not None and found_inf.item() != 0:
        return
    for i, (param, grad) in enumerate(zip(params, grads)):
        dtype = compute_dtype(param)
        m_scale, h_scale = (scales[i] if scales else None for scales in (exp_avg_scales, hessian_scales))
        lr_ = lr_tensor.to(dtype) if lr_tensor is not None else lr
        g = effective_grad(grad, dtype, grad_scale, maximize)
        p = (master_params[i] if master_params else param).to(dtype)
        m = load(exp_avgs[i], m_scale, block_size, dtype)
        h = load(hessians[i], h_scale, block_size, dtype)

        m = beta1 * m + (1 - beta1) * g
        ratio = (m.abs() / (((rho * bs) * h).clamp(min=0) + 1e-15)).clamp(max=1)
        u = lr_ * torch.sign(m) * ratio

        store(exp_avgs[i], m_scale, m, block_size)
        apply_update(param, master_params, i, p, u, g, lr_, weight_decay, False, sr_seed)
