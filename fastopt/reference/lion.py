"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), one tensor at a time.

With g the (unscaled, possibly negated) gradient:

    u = lr · sign(β1·m + (1 − β1)·g)
    p ← p·(1 − lr·wd) − u               (cautious: u masked, see fastopt.reference.update)
    m ← β2·m + (1 − β2)·g

sign(0) = 0 and sign(NaN) = NaN, as torch.sign. Math runs in float32, or float64 for float64 tensors.
"""

from __future__ import annotations

import torch

from .moments import load, store
from .update import apply_update, compute_dtype, effective_grad


@torch.no_grad()
def lion_step(params, grads, exp_avgs, exp_avg_scales, master_params, lr_tensor, lr, beta1, beta2, weight_decay,
              maximize, cautious, block_size, sr_seed, grad_scale, found_inf) -> None:
    if found_inf is not None and found_inf.item() != 0:
        return
    for i, (param, grad) in enumerate(zip(params, grads)):
        dtype = compute_dtype(param)
        m_scale = exp_avg_scales[i] if exp_avg_scales else None
        lr_ = lr_tensor.to(dtype) if lr_tensor is not None else lr
        g = effective_grad(grad, dtype, grad_scale, maximize)
        p = (master_params[i] if master_params else param).to(dtype)
        m = load(exp_avgs[i], m_scale, block_size, dtype)

        u = lr_ * torch.sign(beta1 * m + (1 - beta1) * g)
        m = beta2 * m + (1 - beta2) * g

        store(exp_avgs[i], m_scale, m, block_size)
        apply_update(param, master_params, i, p, u, g, lr_, weight_decay, cautious, sr_seed)
