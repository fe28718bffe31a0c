"""Matmul-bound kernels: the Newton-Schulz engine (fastopt.ops.newton_schulz, bf16) and the Kronecker-factor
update (fastopt.ops.kron_factor_update, fp32) per backend, in dense-equivalent GFLOP/s and as a fraction of the
rate of ``torch.mm`` of the same dtype on the op's largest product, timed interleaved with the op. Dense-equivalent:
a kernel that skips FLOPs (symmetric products, the Gram form: fastopt.ops.newton_schulz) can pass 100%."""

from __future__ import annotations

import pytest
import torch

from fastopt import ops
from fastopt.ops.newton_schulz import flops as ns_flops

from .micro import DEVICE, matmul_figures, measure, skip_unless_runs

SHAPES = ((512, 512), (768, 3072))
BACKENDS = ("torch", "cpu", "triton")  # neither op has a CUDA C++ kernel yet
NS_STEPS = 5


def ns_configs(m: int, n: int, backend: str, device: torch.device = DEVICE) -> tuple[dict, float, float]:
    """({"newton_schulz": 5 steps on a (m, n) matrix, "mm": bf16 (m, n) @ (n, m)}, dense FLOPs of each)."""
    x = torch.randn(m, n, device=device)
    a, b = x.bfloat16(), x.bfloat16().T.contiguous()
    configs = {"newton_schulz": lambda: ops.newton_schulz(x, steps=NS_STEPS, backend=backend),
               "mm": lambda: torch.mm(a, b)}
    return configs, ns_flops(m, n, NS_STEPS), 2 * m * m * n


def kron_configs(m: int, n: int, backend: str, device: torch.device = DEVICE) -> tuple[dict, float, float]:
    """({"kron_factor_update": L (m, m) and R (n, n) of a (m, n) gradient, "mm": fp32 (n, m) @ (m, n), R's
    product}, dense FLOPs of each)."""
    g = torch.randn(m, n, device=device)
    left, right = torch.zeros(m, m, device=device), torch.zeros(n, n, device=device)
    gt = g.T.contiguous()
    configs = {"kron_factor_update": lambda: ops.kron_factor_update(left, right, g, 0.95, backend=backend),
               "mm": lambda: torch.mm(gt, g)}
    return configs, 2 * m * n * (m + n), 2 * n * n * m


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["newton_schulz", "kron_factor_update"])
def test_matrix_op(benchmark, op, backend, shape):
    skip_unless_runs(backend)
    configs, flops, mm_flops = (ns_configs if op == "newton_schulz" else kron_configs)(*shape, backend)
    times = measure(benchmark, configs, budget=2.0, max_rounds=20)
    benchmark.extra_info.update(matmul_figures(times[op], flops, times["mm"], mm_flops))
