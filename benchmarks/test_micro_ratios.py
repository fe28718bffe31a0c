"""The perf gate's subset (benchmarks/perf_gate.py): ratios of configurations timed interleaved in the same
run, each a speed-up (higher is better), in ``extra_info["ratio"]`` under the name ``extra_info["ratio_name"]``.
Absolute times are never compared across runs."""

from __future__ import annotations

import pytest
import torch

import fastopt
from fastopt import backends, ops

from .micro import DEVICE, matmul_figures, measure, ratio
from .test_micro_elementwise import step_op
from .test_micro_matrix import kron_configs, ns_configs

KERNEL = backends.select("auto", DEVICE, torch.float32)  # fastopt's element-wise kernel here: cpu (cuda on a GPU)
NUMEL = 2**23  # elements of the element-wise steps, well beyond the last-level cache
BUDGET = 4.0  # seconds of timed rounds per ratio


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One CPU thread: with two, a parallel region waits out a scheduler tick whenever another process holds the
    other core (measured here: a 0.5 ms step took 8 ms), noise that no estimator filters; one thread is only ever
    delayed, never held at a barrier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def record(benchmark, name: str, value: float) -> None:
    benchmark.extra_info.update(ratio_name=f"{DEVICE.type}: {name}", ratio=value)


def _adamw_steps(benchmark, peer: str | None, state_dtypes: tuple[str, ...]) -> dict:
    """Seconds per step of fastopt.AdamW in each state dtype (configs "adamw-<dtype>") and of a torch.optim.AdamW
    peer ("torch-<peer>"), all updating one shared set of 8 (1024, 1024) params."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(NUMEL // 8 // 1024, 1024, device=DEVICE) * 0.02) for _ in range(8)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizers = {f"adamw-{s}": fastopt.AdamW(params, state_dtype=s) for s in state_dtypes}
    if peer:
        optimizers[f"torch-{peer}"] = torch.optim.AdamW(params, **{peer: True})
    return measure(benchmark, {name: opt.step for name, opt in optimizers.items()}, budget=BUDGET, max_rounds=100)


def test_adamw_vs_torch_fused(benchmark):
    times = _adamw_steps(benchmark, "fused", ("fp32",))
    record(benchmark, "AdamW step fp32 state, torch.optim.AdamW(fused=True) time / fastopt time",
           ratio(times["torch-fused"], times["adamw-fp32"]))


def test_adamw_bf16_vs_fp32(benchmark):
    times = _adamw_steps(benchmark, None, ("bf16", "fp32"))
    record(benchmark, "fastopt.AdamW step, fp32-state time / bf16-state time",
           ratio(times["adamw-fp32"], times["adamw-bf16"]))


def test_adamw_fp8_vs_fp32(benchmark):
    times = _adamw_steps(benchmark, None, ("fp8", "fp32"))
    record(benchmark, "fastopt.AdamW step, fp32-state time / fp8-state time",
           ratio(times["adamw-fp32"], times["adamw-fp8"]))


def test_lion_kernel_vs_torch_backend(benchmark):
    fn, args = step_op("lion", 2**21, "fp32")
    times = measure(benchmark, {f"lion-{KERNEL}": lambda: fn(KERNEL, *args), "lion-torch": lambda: fn("torch", *args)},
                    budget=BUDGET, max_rounds=100)
    record(benchmark, "lion_step fp32 state, torch-backend time / fused-kernel time",
           ratio(times["lion-torch"], times[f"lion-{KERNEL}"]))


def test_newton_schulz_vs_mm(benchmark):
    configs, flops, mm_flops = ns_configs(512, 2048, "auto")
    times = measure(benchmark, configs, budget=BUDGET, max_rounds=100)
    benchmark.extra_info.update(matmul_figures(times["newton_schulz"], flops, times["mm"], mm_flops))
    record(benchmark, "newton_schulz 512x2048 bf16, dense GFLOP/s / bf16 torch.mm GFLOP/s",
           ratio(times["mm"], times["newton_schulz"]) * flops / mm_flops)


def test_kron_factor_update_vs_mm(benchmark):
    configs, flops, mm_flops = kron_configs(512, 2048, "auto")
    times = measure(benchmark, configs, budget=BUDGET, max_rounds=100)
    benchmark.extra_info.update(matmul_figures(times["kron_factor_update"], flops, times["mm"], mm_flops))
    record(benchmark, "kron_factor_update 512x2048 fp32, GFLOP/s / fp32 torch.mm GFLOP/s",
           ratio(times["mm"], times["kron_factor_update"]) * flops / mm_flops)


def test_clamp_to_quantile_vs_torch_backend(benchmark):
    x = torch.randn(512, 2048, device=DEVICE)
    kernel = "cpu" if DEVICE.type == "cpu" else "triton"
    times = measure(benchmark, {f"clamp-{kernel}": lambda: ops.clamp_to_quantile(x, backend=kernel),
                                "clamp-torch": lambda: ops.clamp_to_quantile(x, backend="torch")}, budget=BUDGET)
    record(benchmark, "clamp_to_quantile 512x2048, torch-backend time / kernel time",
           ratio(times["clamp-torch"], times[f"clamp-{kernel}"]))

