"""What the kernel microbenchmarks (benchmarks/test_micro_*.py, run by pytest-benchmark) share: the device,
which backends can run on it, interleaved timing, the derived figures (GB/s and % of the same-run memory
bandwidth; GFLOP/s and % of the same-run matmul rate) and the perf gate's deliberate slowdown.

    pytest benchmarks/test_micro_*.py --benchmark-json FILE    # every op x backend x size
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import pytest
import torch

from fastopt import backends

from .cli import timed

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SLOWDOWN_ENV = "FASTOPT_PERF_GATE_SLOWDOWN"


def skip_unless_runs(backend: str, device: torch.device = DEVICE) -> None:
    """Skip the test unless ``backend`` runs compiled kernels on ``device`` (Triton's interpreter is no timing)."""
    runs_on = {"torch": True, "cpu": device.type == "cpu", "triton": device.type == "cuda",
               "cuda": device.type == "cuda"}[backend]
    if not runs_on:
        pytest.skip(f"backend {backend} does not run on {device.type} tensors here")
    if not backends.probe(backend).available:
        pytest.skip(f"backend {backend}: {backends.probe(backend).reason}")


def slowdowns() -> dict[str, float]:
    """``FASTOPT_PERF_GATE_SLOWDOWN="config[:factor],..."``: the named configurations of ``measure`` take
    ``factor`` (default 2) times as long, to show that the perf gate catches a regression."""
    items = filter(None, os.environ.get(SLOWDOWN_ENV, "").split(","))
    return {name.strip(): float(factor or 2) for name, _, factor in (item.partition(":") for item in items)}


def _slowed(fn: Callable, factor: float, device: torch.device) -> Callable:
    def call():
        time.sleep((factor - 1) * timed(fn, device))
    return call


def measure(benchmark, configs: dict[str, Callable], device: torch.device = DEVICE, budget: float = 1.0,
            max_rounds: int = 50, min_rounds: int = 3) -> dict[str, list[float]]:
    """Seconds per call of every configuration, timed round-robin (interleaved, so machine noise hits all of
    them alike) after two warm-up calls each: the first through pytest-benchmark (the test's row in its JSON),
    the others in each round's setup. Rounds: as many as fit ``budget`` seconds, within the bounds."""
    slow = slowdowns()
    configs = {name: _slowed(fn, slow[name], device) if name in slow else fn for name, fn in configs.items()}
    first, *others = configs
    for fn in configs.values():  # the first call allocates state, builds or autotunes kernels
        fn()
    warm = sum(timed(fn, device) for fn in configs.values())
    rounds = max(min_rounds, min(max_rounds, int(budget / warm)))
    times = {name: [] for name in configs}

    def setup():
        for name in others:
            times[name].append(timed(configs[name], device))

    benchmark.pedantic(lambda: times[first].append(timed(configs[first], device)), setup=setup, rounds=rounds)
    return {name: t[-rounds:] for name, t in times.items()}


def bandwidth_figures(seconds: list[float], moved: int, bandwidth_gbps: float) -> dict:
    """GB/s of a kernel that moves ``moved`` bytes per call (median time), and its fraction of the bandwidth."""
    gbps = moved / statistics.median(seconds) / 1e9
    return {"bytes": moved, "GBps": gbps, "bandwidth_GBps": bandwidth_gbps, "bandwidth_fraction": gbps / bandwidth_gbps}


def matmul_figures(seconds: list[float], flops: float, mm_seconds: list[float], mm_flops: float) -> dict:
    """GFLOP/s of a kernel of ``flops`` per call and of the same-run ``torch.mm`` reference (median times)."""
    gflops = flops / statistics.median(seconds) / 1e9
    mm = mm_flops / statistics.median(mm_seconds) / 1e9
    return {"flops": flops, "GFLOPs": gflops, "mm_GFLOPs": mm, "mm_fraction": gflops / mm}


def nbytes(*tensors) -> int:
    """Bytes of the tensors, also inside lists (None entries count nothing)."""
    flat = [t for x in tensors for t in (x if isinstance(x, (list, tuple)) else [x])]
    return sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))


def ratio(numerator: list[float], denominator: list[float]) -> float:
    """min(numerator) / min(denominator): machine noise only ever adds time, so the fastest round of each
    configuration is the one least disturbed."""
    return min(numerator) / min(denominator)
