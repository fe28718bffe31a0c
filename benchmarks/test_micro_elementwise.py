"""Bandwidth-bound kernels: the fused element-wise step of every optimizer (fastopt.ops) per state dtype and
backend, and the fp8 state codec (fastopt.state), in GB/s (the bytes a perfect kernel moves: what the op writes
counted read and written, what it only reads counted once) and as a fraction of the same-run bandwidth."""

from __future__ import annotations

import pytest
import torch

from fastopt import ops
from fastopt.state import DEFAULT_BLOCK_SIZE, STATE_DTYPES, dequantize_e4m3, num_blocks, quantize_e4m3

from .micro import DEVICE, bandwidth_figures, measure, nbytes, skip_unless_runs

# elements, in 4 tensors of 1024 columns: 1M fits the last-level cache (32 MiB here: its GB/s can exceed the
# DRAM bandwidth), 16M streams from memory
SIZES = (2**20, 2**24)
BLOCK = DEFAULT_BLOCK_SIZE


def _moment(params, state_dtype: str) -> tuple[list, list]:
    """A moment of every param as the optimizers store it: (tensors, fp8 scales or [])."""
    codes = [torch.zeros_like(p, dtype=STATE_DTYPES[state_dtype]) for p in params]
    scales = [torch.zeros(num_blocks(p.numel(), BLOCK), device=p.device) for p in params]
    return codes, scales if state_dtype == "fp8" else []


def _steps(params) -> list:
    return [torch.ones((), device=p.device) for p in params]


def _tail() -> tuple:
    """block_size, sr_seed (-1: round to nearest), grad_scale, found_inf."""
    return BLOCK, -1, None, None


def _adam(p, g, s):
    (m, ms), (v, vs) = _moment(p, s), _moment(p, s)
    return (p, g, m, v, [], ms, vs, [], [], _steps(p), None, 1e-3, 0.9, 0.999, 1e-8, 0.01, False, False, False,
            *_tail())


def _lion(p, g, s):
    m, ms = _moment(p, s)
    return (p, g, m, ms, [], None, 1e-4, 0.9, 0.99, 0.0, False, False, *_tail())


def _mars(p, g, s):
    (m, ms), (v, vs), (last, ls) = _moment(p, s), _moment(p, s), _moment(p, s)
    return (p, g, m, v, [], last, ms, vs, [], ls, [], _steps(p), None, 3e-3, 0.95, 0.99, 1e-8, 0.0, 0.025, False,
            False, *_tail())


def _sophia(p, g, s):
    (m, ms), (h, hs) = _moment(p, s), _moment(p, s)
    return (p, g, m, h, ms, hs, [], None, 2e-4, 0.965, 0.04, 5120.0, 0.1, False, *_tail())


def _adam_mini(p, g, s):
    """One second-moment block per row (Adam-mini's V / MLP rule): the step sizes are one fp32 per row."""
    m, ms = _moment(p, s)
    step_sizes = [torch.full((x.size(0),), 1e-3, device=x.device) for x in p]
    return (p, g, m, ms, step_sizes, [x.size(1) for x in p], [], None, 1e-3, 0.9, 0.1, False, *_tail())


# op name: (fastopt.ops function, its arguments for (params, grads, state dtype) as the optimizers pass them)
STEPS = {"adam": (ops.adam_step, _adam), "lion": (ops.lion_step, _lion), "mars": (ops.mars_step, _mars),
         "sophia": (ops.sophia_step, _sophia), "adam_mini": (ops.adam_mini_step, _adam_mini)}


def step_op(name: str, numel: int, state_dtype: str, device: torch.device = DEVICE):
    """(fastopt.ops function, its arguments less the backend) of the element-wise step ``name`` on ``numel``
    elements in 4 fp32 tensors."""
    torch.manual_seed(0)
    shape = (numel // 4096, 1024)
    params = [torch.randn(shape, device=device) * 0.02 for _ in range(4)]
    grads = [torch.randn(shape, device=device) * 1e-3 for _ in range(4)]
    fn, make = STEPS[name]
    return fn, make(params, grads, state_dtype)


def moved_bytes(name: str, args: tuple) -> int:
    """Bytes a perfect kernel moves: the arguments the op mutates (its schema) read and written, the others read."""
    schema = getattr(torch.ops.fastopt, f"{name}_step_triton_").default._schema
    return sum(nbytes(a) * (2 if s.alias_info is not None and s.alias_info.is_write else 1)
               for s, a in zip(schema.arguments, args))


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "cuda"])
@pytest.mark.parametrize("state_dtype", list(STATE_DTYPES))
@pytest.mark.parametrize("op", list(STEPS))
def test_step(benchmark, bandwidth, op, state_dtype, backend, numel):
    skip_unless_runs(backend)
    fn, args = step_op(op, numel, state_dtype)
    times = measure(benchmark, {op: lambda: fn(backend, *args)})
    bandwidth.sample()
    benchmark.extra_info.update(bandwidth_figures(times[op], moved_bytes(op, args), bandwidth.best))


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("direction", ["quantize", "dequantize"])
def test_e4m3(benchmark, bandwidth, direction, numel):
    """fastopt.state's blockwise e4m3 codec (plain torch: the kernels fuse their own)."""
    x = torch.randn(numel, device=DEVICE)
    codes, scales = quantize_e4m3(x, BLOCK)
    if direction == "quantize":
        times = measure(benchmark, {direction: lambda: quantize_e4m3(x, BLOCK)})
    else:
        times = measure(benchmark, {direction: lambda: dequantize_e4m3(codes, scales, BLOCK)})
    bandwidth.sample()
    benchmark.extra_info.update(bandwidth_figures(times[direction], nbytes(x, codes, scales), bandwidth.best))
