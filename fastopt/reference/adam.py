"""AdamW and NAdamW, one tensor at a time, in plain torch.

With t the step count after incrementing, g the (unscaled, possibly negated) gradient:

    p ← p·(1 − lr·wd)
    m ← m + (1 − β1)·(g − m)
    v ← β2·v + (1 − β2)·g²              (amsgrad: v̂ ← max(v̂, v), used in place of v)
    d = √v / √(1 − β2^t) + eps
    AdamW:  p ← p − lr/(1 − β1^t) · m / d
    NAdamW: p ← p − lr · (β1·m/(1 − β1^(t+1)) + (1 − β1)·g/(1 − β1^t)) / d

Math runs in float32, or float64 for float64 tensors (the ground-truth oracle).
"""

from __future__ import annotations

import torch

from .moments import load, store
from .rounding import bf16_stochastic_round, sr_tensor_key


@torch.no_grad()
def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales,
              max_exp_avg_sq_scales, master_params, state_steps, lr_tensor, lr, beta1, beta2, eps,
              weight_decay, nesterov, maximize, block_size, sr_seed, grad_scale, found_inf) -> None:
    if found_inf is not None and found_inf.item() != 0:
        return
    amsgrad = len(max_exp_avg_sqs) > 0
    for i, (param, grad) in enumerate(zip(params, grads)):
        dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        m_scale, v_scale, vmax_scale = (scales[i] if scales else None
                                        for scales in (exp_avg_scales, exp_avg_sq_scales, max_exp_avg_sq_scales))
        t = state_steps[i].to(dtype)
        lr_ = lr_tensor.to(dtype) if lr_tensor is not None else lr

        g = grad.to(dtype)
        if grad_scale is not None:
            g = g / grad_scale.to(dtype)
        if maximize:
            g = -g
        p = (master_params[i] if master_params else param).to(dtype)
        m = load(exp_avgs[i], m_scale, block_size, dtype)
        v = load(exp_avg_sqs[i], v_scale, block_size, dtype, squared=True)

        p = p * (1 - lr_ * weight_decay)
        m = m + (1 - beta1) * (g - m)
        v = beta2 * v + (1 - beta2) * g * g
        bias1 = 1 - beta1 ** t
        bias2 = 1 - beta2 ** t
        v_used = v
        if amsgrad:
            vmax = load(max_exp_avg_sqs[i], vmax_scale, block_size, dtype, squared=True)
            v_used = torch.maximum(vmax, v)
            store(max_exp_avg_sqs[i], vmax_scale, v_used, block_size, squared=True)
        denom = v_used.sqrt() / bias2.sqrt() + eps
        if nesterov:
            m_hat = beta1 * m / (1 - beta1 ** (t + 1)) + (1 - beta1) * g / bias1
            p = p - lr_ * m_hat / denom
        else:
            p = p - (lr_ / bias1) * m / denom

        store(exp_avgs[i], m_scale, m, block_size)
        store(exp_avg_sqs[i], v_scale, v, block_size, squared=True)
        if master_params:
            master_params[i].copy_(p)
        if sr_seed >= 0 and param.dtype == torch.bfloat16:
            param.copy_(bf16_stochastic_round(p, sr_tensor_key(sr_seed, i)))
        else:
            param.copy_(p)
