"""Standard normal numbers of the counter-based stream of fastopt.reference.noise (Philox4x32-10 and Box–Muller):
the C++ kernel ``fastopt::philox_normal_`` (csrc/cpu/philox_normal.cpp) on the cpu backend, the reference's torch
code on the others. Both give the same numbers to a few float32 ulps."""

from __future__ import annotations

import torch

from ..reference import noise


def philox_normal(n: int, seed: int, counter: int, backend: str = "torch") -> torch.Tensor:
    """n float32 numbers on the CPU, from ``counter`` of the stream ``seed``."""
    noise.check_draw(n, seed, counter)
    if backend == "cpu":
        out = torch.empty(n)
        torch.ops.fastopt.philox_normal_(out, seed, counter)
        return out
    if backend in ("torch", "triton"):  # the triton backend runs Kron's torch code on CPU tensors
        return noise.philox_normal(n, seed, counter)
    raise ValueError(f"no Philox noise for backend {backend!r} (CPU tensors: cpu, torch or triton)")
