"""Loading and storing a moment tensor in its storage format (see fastopt.state)."""

from __future__ import annotations

import torch

from ..state import dequantize_e4m3, quantize_e4m3


def load(stored: torch.Tensor, scales: torch.Tensor | None, block_size: int, dtype: torch.dtype,
         squared: bool = False) -> torch.Tensor:
    """The moment's value in ``dtype``; ``squared`` marks a second moment (fp8 keeps its root)."""
    if stored.dtype != torch.float8_e4m3fn:
        return stored.to(dtype)
    root = dequantize_e4m3(stored, scales, block_size, dtype)
    return root * root if squared else root


def store(stored: torch.Tensor, scales: torch.Tensor | None, value: torch.Tensor, block_size: int,
          squared: bool = False) -> None:
    if stored.dtype != torch.float8_e4m3fn:
        stored.copy_(value)
        return
    codes, new_scales = quantize_e4m3(value.sqrt() if squared else value, block_size)
    stored.copy_(codes)
    scales.copy_(new_scales)
