"""Newton-Schulz engine throughput: fastopt.ops.newton_schulz on every backend that runs here, in
dense-equivalent GFLOP/s (4m²n + 2m³ per step, fastopt.ops.newton_schulz.flops) and as a fraction
of the ``torch.mm`` rate in the iteration's precision (bf16, or fp32 without TF32) measured in the same
run, in rounds interleaved with the engines', on the iteration's largest product (one matrix's: a batch can
exceed 100%); with the FLOPs each
backend actually spends, as a fraction of the dense count (the CPU engine's symmetric products and
Gram form: fastopt.ops.newton_schulz.cpu_flops; the Triton kernels' triangle of tiles: triton_flops;
cuBLAS SYRK's one triangle in fp32: fastopt.ops.newton_schulz.cuda_flops).

    python -m fastopt bench ns [--shapes 768x768,768x3072,...] [--batch 1] [--precision bf16|fp32]
                               [--rounds 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from fastopt.backends import probe
from fastopt.ops import newton_schulz
from fastopt.ops.newton_schulz import cpu_flops, cuda_flops, flops, triton_flops

from .cli import add_common_arguments, timed, write_json

SHAPES = ((768, 768), (768, 3072), (2048, 2048), (2048, 8192))
STEPS = 5


def interleaved_medians(fns: dict, rounds: int, device: torch.device) -> dict:
    """Median seconds of each callable, timed in interleaved rounds, so that a ratio of two of them compares the
    same moments of a machine whose speed drifts. In each round each callable runs twice and the second call is
    timed: every sample starts with the callable's operands in cache, as back-to-back calls do (a lone mm timed
    right after a Newton-Schulz call ran at half its back-to-back rate here)."""
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            samples[name].append(timed(fn, device))
    return {name: statistics.median(times) for name, times in samples.items()}


def spent_fraction(backend: str, m: int, n: int, precision: str) -> float:
    """FLOPs ``backend`` spends over the dense count."""
    if backend == "cpu":
        spent = cpu_flops(m, n, STEPS, precision=precision)
    elif backend == "triton":
        spent = triton_flops(m, n, STEPS, precision)
    elif backend == "cuda":
        spent = cuda_flops(m, n, STEPS, precision)
    else:
        spent = flops(m, n, STEPS)
    return spent / flops(m, n, STEPS)


def run(shapes, batch: int, device: torch.device, rounds: int, precision: str = "bf16") -> list[dict]:
    backends = ["cpu", "torch"] if device.type == "cpu" else [
        b for b in ("torch", "triton", "cuda") if b == "torch" or probe(b).available]
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    rows = []
    for m, n in shapes:
        x = torch.randn(batch, m, n, device=device) if batch > 1 else torch.randn(m, n, device=device)
        # the mm rate: torch.mm on (m, n) @ (n, m), the shape of the iteration's largest product
        a = torch.randn(min(m, n), max(m, n), device=device, dtype=dtype)
        b = torch.randn(max(m, n), min(m, n), device=device, dtype=dtype)
        c = torch.empty(a.shape[0], a.shape[0], device=device, dtype=dtype)  # no allocation inside the timing
        fns = {"mm": lambda: torch.mm(a, b, out=c)}
        for backend in backends:
            fns[backend] = lambda backend=backend: newton_schulz(x, steps=STEPS, backend=backend, precision=precision)
        seconds = interleaved_medians(fns, rounds, device)
        peak = 2 * a.shape[0] * a.shape[0] * a.shape[1] / seconds["mm"] / 1e9
        for backend in backends:
            gflops = batch * flops(m, n, STEPS) / seconds[backend] / 1e9
            rows.append({"shape": f"{batch}x{m}x{n}" if batch > 1 else f"{m}x{n}", "backend": backend,
                         "ms": seconds[backend] * 1e3, "GFLOPs": gflops, "mm_GFLOPs": peak,
                         "fraction": gflops / peak, "work": spent_fraction(backend, m, n, precision),
                         "precision": precision})
    return rows


def format_table(rows, device, threads) -> str:
    precision = rows[0]["precision"] if rows else "bf16"
    lines = [f"Newton-Schulz, {STEPS} steps, {precision}, {device}, {threads} threads; GFLOP/s counted dense "
             f"(4m²n + 2m³ per step); the {precision} mm rate measured in the same run on (m, n) @ (n, m)",
             f"| shape | backend | FLOPs done / dense | ms | GFLOP/s | {precision} mm GFLOP/s | % of mm |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['backend']} | {100 * r['work']:.0f}% | {r['ms']:.1f} | {r['GFLOPs']:.0f} | "
                     f"{r['mm_GFLOPs']:.0f} | {100 * r['fraction']:.0f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastopt bench ns", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(f"{m}x{n}" for m, n in SHAPES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    add_common_arguments(parser, rounds=5)
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    device = torch.device(args.device)
    rows = run(shapes, args.batch, device, args.rounds, args.precision)
    print(format_table(rows, device, torch.get_num_threads()), flush=True)
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
