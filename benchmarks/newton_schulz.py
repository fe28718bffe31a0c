"""Newton-Schulz engine throughput: fastopt.ops.newton_schulz on every backend that runs here, in
dense-equivalent GFLOP/s (4m²n + 2m³ per step, fastopt.ops.newton_schulz.flops) and as a fraction
of the bf16 ``torch.mm`` rate measured in the same run on the iteration's largest product; with the
FLOPs each backend actually spends, as a fraction of the dense count (the CPU engine's symmetric
products and Gram form: fastopt.ops.newton_schulz.cpu_flops).

    python -m fastopt bench ns [--shapes 768x768,768x3072,...] [--batch 1] [--rounds 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from fastopt.ops import newton_schulz
from fastopt.ops.newton_schulz import cpu_flops, flops

from .cli import add_common_arguments, timed, write_json

SHAPES = ((768, 768), (768, 3072), (2048, 2048), (2048, 8192))
STEPS = 5


def _median_seconds(fn, rounds: int, device: torch.device) -> float:
    fn()  # warm-up
    return statistics.median(timed(fn, device) for _ in range(rounds))


def matmul_rate(m: int, n: int, device: torch.device, rounds: int) -> float:
    """bf16 torch.mm GFLOP/s on (m, n) @ (n, m), the shape of the iteration's largest product."""
    a = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, m, device=device, dtype=torch.bfloat16)
    return 2 * m * m * n / _median_seconds(lambda: torch.mm(a, b), rounds, device) / 1e9


def run(shapes, batch: int, device: torch.device, rounds: int) -> list[dict]:
    backends = ["cpu", "torch"] if device.type == "cpu" else ["torch"]
    rows = []
    for m, n in shapes:
        x = torch.randn(batch, m, n, device=device) if batch > 1 else torch.randn(m, n, device=device)
        peak = matmul_rate(min(m, n), max(m, n), device, rounds)
        for backend in backends:
            seconds = _median_seconds(lambda: newton_schulz(x, steps=STEPS, backend=backend), rounds, device)
            gflops = batch * flops(m, n, STEPS) / seconds / 1e9
            work = cpu_flops(m, n, STEPS) / flops(m, n, STEPS) if backend == "cpu" else 1.0
            rows.append({"shape": f"{batch}x{m}x{n}" if batch > 1 else f"{m}x{n}", "backend": backend,
                         "ms": seconds * 1e3, "GFLOPs": gflops, "bf16_mm_GFLOPs": peak, "fraction": gflops / peak,
                         "work": work})
    return rows


def format_table(rows, device, threads) -> str:
    lines = [f"Newton-Schulz, {STEPS} steps, bf16, {device}, {threads} threads; GFLOP/s counted dense (4m²n + 2m³ "
             "per step); the bf16 mm rate measured in the same run on (m, n) @ (n, m)",
             "| shape | backend | FLOPs done / dense | ms | GFLOP/s | bf16 mm GFLOP/s | % of mm |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['backend']} | {100 * r['work']:.0f}% | {r['ms']:.1f} | {r['GFLOPs']:.0f} | "
                     f"{r['bf16_mm_GFLOPs']:.0f} | {100 * r['fraction']:.0f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastopt bench ns", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(f"{m}x{n}" for m, n in SHAPES))
    parser.add_argument("--batch", type=int, default=1)
    add_common_arguments(parser, rounds=5)
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    device = torch.device(args.device)
    rows = run(shapes, args.batch, device, args.rounds)
    print(format_table(rows, device, torch.get_num_threads()), flush=True)
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
