"""Stochastic rounding of fp32 values to bf16, with the integer hash every backend shares."""

from __future__ import annotations

import torch

_MASK = 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding uint32 values (wrapping arithmetic mod 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK
    return x ^ (x >> 16)


def sr_tensor_key(seed: int, tensor_index: int) -> int:
    x = torch.tensor((seed + 0x9E3779B9 * (tensor_index + 1)) & _MASK, dtype=torch.int64)
    return int(hash32(x))


def bf16_stochastic_round(x: torch.Tensor, key: int) -> torch.Tensor:
    """Add 16 hashed random bits below bf16's mantissa, then truncate: unbiased rounding."""
    idx = torch.arange(x.numel(), dtype=torch.int64, device=x.device) & _MASK
    r = hash32(idx ^ key) & 0xFFFF
    bits = x.float().reshape(-1).view(torch.int32).to(torch.int64) & _MASK
    rounded = (((bits + r) >> 16) & 0xFFFF).to(torch.int32)
    # (upper bits as int16) -> bf16 bit pattern
    hi = torch.where(rounded >= 0x8000, rounded - 0x10000, rounded).to(torch.int16)
    return hi.view(torch.bfloat16).view(x.shape)
