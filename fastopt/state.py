"""Low-precision optimizer-state storage.

Three storage dtypes for a moment tensor of a parameter:

* ``fp32``: a plain float32 tensor (float64 for float64 params).
* ``bf16``: a plain bfloat16 tensor, written with round-to-nearest-even.
* ``fp8``: float8_e4m3fn codes of the parameter's shape plus one float32 scale per block of
  ``block_size`` consecutive elements of the flattened tensor: ``x = decode(code) * scale``
  with ``scale = absmax(block) / 448``. Second moments are stored as their square roots
  (``sqrt(v)``), which halves their dynamic range in log space: ``v`` of a 256-element block
  easily spans more than e4m3's 2^17, and a ``v`` that underflows to zero under a non-zero
  first moment turns into an update of size ``m / eps``.

Tensors with fewer than ``MIN_QUANTIZED_NUMEL`` elements always stay fp32, as in
bitsandbytes and torchao: their bytes do not matter and their precision does.

The encoder is defined with integer and float operations (round to nearest even, saturate
at 448) so that every backend, including GPUs without fp8 instructions (sm_80), writes the
same bytes; it equals ``x.clamp(-448, 448).to(torch.float8_e4m3fn)`` bit for bit.
"""

from __future__ import annotations

import torch

STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
MIN_QUANTIZED_NUMEL = 4096
DEFAULT_BLOCK_SIZE = 256
E4M3_MAX = 448.0


def parse_state_dtype(state_dtype: str) -> torch.dtype:
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {sorted(STATE_DTYPES)}, got {state_dtype!r}")
    return STATE_DTYPES[state_dtype]


def check_block_size(block_size: int) -> int:
    if not isinstance(block_size, int) or block_size < 32 or block_size > 4096 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two in [32, 4096], got {block_size!r}")
    return block_size


def storage_dtype_for(param: torch.Tensor, state_dtype: torch.dtype) -> torch.dtype:
    """The dtype a moment of ``param`` is stored in under the optimizer's ``state_dtype``."""
    if param.dtype == torch.float64:
        return torch.float64
    if state_dtype != torch.float32 and param.numel() < MIN_QUANTIZED_NUMEL:
        return torch.float32
    return state_dtype


def num_blocks(numel: int, block_size: int) -> int:
    return -(-numel // block_size)


def _blocked(x: torch.Tensor, block_size: int) -> torch.Tensor:
    flat = x.reshape(-1)
    pad = num_blocks(flat.numel(), block_size) * block_size - flat.numel()
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size)


def quantize_e4m3(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantisation to e4m3fn: returns (codes shaped like x, fp32 scales)."""
    blocks = _blocked(x.float(), block_size)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    # true divisions, as the kernels divide: torch's tensor / 448.0 on CUDA multiplies by the reciprocal (scales an
    # ulp off absmax / 448, seen on an H200), and its 448.0 / tensor is reciprocal × 448 (an ulp off 448 / absmax
    # for about a quarter of absmax values, which then moved codes at rounding ties)
    scales = absmax / torch.full_like(absmax, E4M3_MAX)
    inv = torch.where(absmax > 0, torch.full_like(absmax, E4M3_MAX) / absmax, torch.zeros_like(absmax))
    codes = (blocks * inv).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes.reshape(-1)[: x.numel()].view(x.shape), scales.view(-1)


def dequantize_e4m3(codes: torch.Tensor, scales: torch.Tensor, block_size: int, dtype=torch.float32) -> torch.Tensor:
    blocks = _blocked(codes.to(dtype), block_size)
    return (blocks * scales.to(dtype).view(-1, 1)).reshape(-1)[: codes.numel()].view(codes.shape)
