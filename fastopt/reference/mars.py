"""MARS-AdamW (Yuan et al. 2025, "MARS: Unleashing the Power of Variance Reduction for Training
Large Models"), one tensor at a time, in plain torch.

With t the step count after incrementing, g the (unscaled, possibly negated) gradient and g_prev
the gradient of the previous step (stored, zero before the first step):

    c = g + γ·β1/(1 − β1)·(g − g_prev)
    c ← c·s,  s = 1/‖c‖₂ if ‖c‖₂ > 1 else 1      (‖·‖₂ over the whole tensor)
    g_prev ← g
    AdamW on c:  m ← m + (1 − β1)·(c − m),  v ← β2·v + (1 − β2)·c²   (amsgrad: v̂ ← max(v̂, v))
                 u = lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + eps)
    p ← p·(1 − lr·wd) − u               (cautious: u masked against g, see fastopt.reference.update)

Math runs in float32, or float64 for float64 tensors (the ground-truth oracle).
"""

from __future__ import annotations

import torch

from .adam import adam_update
from .moments import load, store
from .update import apply_update, compute_dtype, effective_grad


def clip_factor(c: torch.Tensor) -> torch.Tensor:
    """s = 1/‖c‖₂ if ‖c‖₂ > 1 else 1 (a NaN norm leaves c as it is)."""
    norm = torch.linalg.vector_norm(c)
    return torch.where(norm > 1, 1 / norm, torch.ones_like(norm))


@torch.no_grad()
def mars_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, last_grads, exp_avg_scales, exp_avg_sq_scales,
              max_exp_avg_sq_scales, last_grad_scales, master_params, state_steps, lr_tensor, lr, beta1, beta2, eps,
              weight_decay, gamma, maximize, cautious, block_size, sr_seed, grad_scale, found_inf) -> None:
    if found_inf is not None and found_inf.item() != 0:
        return
    correction = gamma * beta1 / (1 - beta1)
    for i, (param, grad) in enumerate(zip(params, grads)):
        dtype = compute_dtype(param)
        lr_ = lr_tensor.to(dtype) if lr_tensor is not None else lr
        g = effective_grad(grad, dtype, grad_scale, maximize)
        p = (master_params[i] if master_params else param).to(dtype)
        prev_scale = last_grad_scales[i] if last_grad_scales else None
        g_prev = load(last_grads[i], prev_scale, block_size, dtype)

        c = g + correction * (g - g_prev)
        c = c * clip_factor(c)
        u = adam_update(c, i, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales,
                        max_exp_avg_sq_scales, state_steps, lr_, beta1, beta2, eps, False, block_size, dtype)

        store(last_grads[i], prev_scale, g, block_size)
        apply_update(param, master_params, i, p, u, g, lr_, weight_decay, cautious, sr_seed)
