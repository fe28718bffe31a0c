"""AdamW and NAdamW, one tensor at a time, in plain torch.

With t the step count after incrementing, g the (unscaled, possibly negated) gradient:

    m ← m + (1 − β1)·(g − m)
    v ← β2·v + (1 − β2)·g²              (amsgrad: v̂ ← max(v̂, v), used in place of v)
    d = √v / √(1 − β2^t) + eps
    AdamW:  u = lr/(1 − β1^t) · m / d
    NAdamW: u = lr · (β1·m/(1 − β1^(t+1)) + (1 − β1)·g/(1 − β1^t)) / d
    p ← p·(1 − lr·wd) − u               (cautious: u masked, see fastopt.reference.update)

Math runs in float32, or float64 for float64 tensors (the ground-truth oracle).
"""

from __future__ import annotations

import torch

from .moments import load, store
from .update import apply_update, compute_dtype, effective_grad


@torch.no_grad()
def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales,
              max_exp_avg_sq_scales, master_params, state_steps, lr_tensor, lr, beta1, beta2, eps,
              weight_decay, nesterov, maximize, cautious, block_size, sr_seed, grad_scale, found_inf) -> None:
    if found_inf is not None and found_inf.item() != 0:
        return
    for i, (param, grad) in enumerate(zip(params, grads)):
        dtype = compute_dtype(param)
        lr_ = lr_tensor.to(dtype) if lr_tensor is not None else lr
        g = effective_grad(grad, dtype, grad_scale, maximize)
        p = (master_params[i] if master_params else param).to(dtype)
        u = adam_update(g, i, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales,
                        max_exp_avg_sq_scales, state_steps, lr_, beta1, beta2, eps, nesterov, block_size, dtype)
        apply_update(param, master_params, i, p, u, g, lr_, weight_decay, cautious, sr_seed)


def adam_update(g, i, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales,
                max_exp_avg_sq_scales, state_steps, lr, beta1, beta2, eps, nesterov, block_size, dtype):
    """Advances the moments of tensor i with the gradient g (stored back in their formats) and returns
    the update u (the formulas above; amsgrad when max_exp_avg_sqs is not empty)."""
    m_scale, v_scale, vmax_scale = (scales[i] if scales else None
                                    for scales in (exp_avg_scales, exp_avg_sq_scales, max_exp_avg_sq_scales))
    t = state_steps[i].to(dtype)
    m = load(exp_avgs[i], m_scale, block_size, dtype)
    v = load(exp_avg_sqs[i], v_scale, block_size, dtype, squared=True)
    m = m + (1 - beta1) * (g - m)
    v = beta2 * v + (1 - beta2) * g * g
    bias1 = 1 - beta1 ** t
    bias2 = 1 - beta2 ** t
    v_used = v
    if max_exp_avg_sqs:
        vmax = load(max_exp_avg_sqs[i], vmax_scale, block_size, dtype, squared=True)
        v_used = torch.maximum(vmax, v)
        store(max_exp_avg_sqs[i], vmax_scale, v_used, block_size, squared=True)
    denom = v_used.sqrt() / bias2.sqrt() + eps
    if nesterov:
        u = lr * (beta1 * m / (1 - beta1 ** (t + 1)) + (1 - beta1) * g / bias1) / denom
    else:
        u = (lr / bias1) * m / denom
    store(exp_avgs[i], m_scale, m, block_size)
    store(exp_avg_sqs[i], v_scale, v, block_size, squared=True)
    return u
