"""What every element-wise rule shares: reading the gradient and the parameter, and applying
an update direction ``u`` with decoupled weight decay and, optionally, the cautious mask.

    p ← p·(1 − lr·wd) − c(u)·u,   c(u) = 1 (plain) or mask / max(mean(mask), 1e-3)
    with mask = [u·g > 0] and the mean over the whole tensor (cautious; Liang et al. 2024)
"""

from __future__ import annotations

import torch

from .rounding import bf16_stochastic_round, sr_tensor_key


def compute_dtype(param: torch.Tensor) -> torch.dtype:
    """float64 for float64 tensors (the ground-truth oracle), float32 otherwise."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def effective_grad(grad: torch.Tensor, dtype: torch.dtype, grad_scale, maximize: bool) -> torch.Tensor:
    """The gradient in ``dtype``, unscaled by AMP's ``grad_scale`` and negated for ``maximize``."""
    g = grad.to(dtype)
    if grad_scale is not None:
        g = g / grad_scale.to(dtype)
    return -g if maximize else g


def cautious_mask(u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """mask / max(mean(mask), 1e-3) with mask = [u·g > 0]: keeps the coordinates where the update
    agrees with the current gradient, rescaled so the update keeps its average size."""
    mask = (u * g > 0).to(u.dtype)
    return mask / mask.mean().clamp(min=1e-3)


def apply_update(param, master_params, i, p, u, g, lr, weight_decay, cautious: bool, sr_seed: int) -> None:
    """p ← p·(1 − lr·wd) − u (masked if cautious), written to the master weights and the param
    (bf16 params: stochastic rounding when ``sr_seed >= 0``)."""
    if cautious:
        u = u * cautious_mask(u, g)
    p = p * (1 - lr * weight_decay) - u
    if master_params:
        master_params[i].copy_(p)
    if sr_seed >= 0 and param.dtype == torch.bfloat16:
        param.copy_(bf16_stochastic_round(p, sr_tensor_key(sr_seed, i)))
    else:
        param.copy_(p)
