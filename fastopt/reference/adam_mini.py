"""The element-wise half of Adam-mini (Zhang et al. 2024, "Adam-mini: Use Fewer Learning Rates To
Gain More"), one tensor at a time: the first moment per element, the step size per segment.

Tensor t is cut into contiguous segments of ``segment_lengths[t]`` elements (a head of Q/K, an
output row, or the whole tensor); ``step_sizes[t][s]`` is segment s's lr/(1 − β1^k) / (√(v_s /
(1 − β2^k)) + eps), computed by fastopt.AdamMini from its per-segment second moments. With g the
(unscaled, possibly negated) gradient:

    m ← β1·m + (1 − β1)·g
    u = m · step_sizes[t][i // L]        (i the element's flat index, L the segment length)
    p ← p·(1 − lr·wd) − u

Math runs in float32, or float64 for float64 tensors.
"""

from __future__ import annotations

import torch

from .moments import load, store
from .update import apply_update, compute_dtype, effective_grad


@torch.no_grad()
def adam_mini_step(params, grads, exp_avgs, exp_avg_scales, step_sizes, segment_lengths, master_params, lr_tensor,
                   lr, beta1, weight_decay, maximize, block_size, sr_seed, grad_scale, found_inf) -> None:
    if found_inf is not None and found_inf.item() != 0:
        return
    for i, (param, grad) in enumerate(zip(params, grads)):
        dtype = compute_dtype(param)
        m_scale = exp_avg_scales[i] if exp_avg_scales else None
        lr_ = lr_tensor.to(dtype) if lr_tensor is not None else lr
        g = effective_grad(grad, dtype, grad_scale, maximize)
        p = (master_params[i] if master_params else param).to(dtype)
        m = load(exp_avgs[i], m_scale, block_size, dtype)

        m = beta1 * m + (1 - beta1) * g
        per_segment = step_sizes[i].to(dtype).reshape(-1, 1)
        u = (m.reshape(-1, segment_lengths[i]) * per_segment).reshape(m.shape)

        store(exp_avgs[i], m_scale, m, block_size)
        apply_update(param, master_params, i, p, u, g, lr_, weight_decay, False, sr_seed)
