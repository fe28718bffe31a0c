"""Optimizer step throughput: every fastopt optimizer on every available backend × state dtype
against its peers (torch.optim, and the other implementations on PyPI when installed: the
``bench`` extra), side by side in one process, on realistic parameter sets.

    python -m fastopt bench step [--optimizer adamw|lion|...|all] [--preset gpt124m|large|tiny|all]
                                 [--json FILE]

Within a table every configuration updates the same parameters (one shared set of params and
grads), and the timed steps are interleaved round-robin so that machine noise hits all of them
alike. Reported per configuration: median ms/step, params/s, effective GB/s (bytes a perfect
kernel moves: params and state read and written, grads read) and its fraction of the memory
bandwidth measured in the same run (an in-place add), speed-up vs the fastest peer, and state
bytes/param.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import statistics
from dataclasses import dataclass, field
from typing import Callable

import torch

import fastopt
from fastopt import backends, reference
from fastopt.ops.newton_schulz import schedule
from fastopt.optim.base import tensor_bytes

from .cli import add_common_arguments, timed, write_json


def gpt_params(layers: int, width: int, vocab: int = 50257, context: int = 1024) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of a GPT-2-style transformer's parameters: matrices, biases and layer norms. Names follow
    the patterns Adam-mini classifies by; the fused QKV matrix is named as a Q projection (one block per head)."""
    named = [("wte.weight", (vocab, width)), ("embed_positions.weight", (context, width))]
    for i in range(layers):
        named += [(f"h.{i}.attn.q_proj.weight", (3 * width, width)), (f"h.{i}.attn.q_proj.bias", (3 * width,)),
                  (f"h.{i}.attn.o_proj.weight", (width, width)), (f"h.{i}.attn.o_proj.bias", (width,)),
                  (f"h.{i}.mlp.c_fc.weight", (4 * width, width)), (f"h.{i}.mlp.c_fc.bias", (4 * width,)),
                  (f"h.{i}.mlp.c_proj.weight", (width, 4 * width)), (f"h.{i}.mlp.c_proj.bias", (width,)),
                  (f"h.{i}.ln_1.weight", (width,)), (f"h.{i}.ln_1.bias", (width,)),
                  (f"h.{i}.ln_2.weight", (width,)), (f"h.{i}.ln_2.bias", (width,))]
    return named + [("ln_f.weight", (width,)), ("ln_f.bias", (width,))]


@dataclass
class Preset:
    """A parameter set: (name, shape) pairs, and the model width and heads (Adam-mini's blocks)."""

    shapes: list
    dim: int
    n_heads: int


PRESETS = {
    "gpt124m": lambda: Preset(gpt_params(12, 768), 768, 12),
    "large": lambda: Preset([(f"layers.{i}.mlp.up_proj.weight", (4096, 4096)) for i in range(4)], 4096, 32),
    "tiny": lambda: Preset(gpt_params(2, 128, vocab=256, context=256), 128, 4),
}


class ParamSet(list):
    """The parameters of a table, a list as the optimizers take it, with the names and model shape that
    Adam-mini's constructors take."""

    def __init__(self, preset: Preset, device: torch.device, hidden_matrices: bool = False):
        shapes = [(name, shape) for name, shape in preset.shapes
                  if not hidden_matrices or (len(shape) == 2 and not any(k in name for k in ("wte", "embed")))]
        self.named = [(name, torch.nn.Parameter(torch.randn(shape, device=device) * 0.02)) for name, shape in shapes]
        super().__init__(p for _, p in self.named)
        self.dim, self.n_heads = preset.dim, preset.n_heads


class Bandwidth:
    """Memory bandwidth of an in-place fp32 add (reads a and b, writes a: the access pattern of an
    optimizer step), sampled once per round between the optimizer steps; the best sample counts."""

    def __init__(self, device: torch.device, numel: int = 64 * 2**20):
        self.device, self.numel = device, numel
        self.a = torch.ones(numel, device=device)
        self.b = torch.ones(numel, device=device)
        self.best = 0.0
        self.sample()  # warm-up

    def sample(self) -> None:
        seconds = timed(lambda: self.a.add_(self.b), self.device)
        self.best = max(self.best, 3 * 4 * self.numel / seconds / 1e9)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _peer(label: str, module: str, name: str, **kwargs) -> tuple:
    """(label, factory, available) of the optimizer class ``module.name`` of a PyPI package (the
    ``bench`` extra), imported only when used."""
    def make(ps):
        return getattr(importlib.import_module(module), name)(ps, **kwargs)
    return label, make, _installed(module.split(".")[0])


def _sophia_h(ps):
    """pytorch-optimizer's SophiaH with its Hessian estimate given once: the timed steps are its update alone,
    like fastopt.Sophia's step (whose Hessian refresh is a separate call)."""
    from pytorch_optimizer import SophiaH

    opt = SophiaH(ps, update_period=2**62, foreach=True)
    opt.step(hessian=[torch.zeros_like(p) for p in ps])
    return opt


def _fastopt_adam_mini(ps: ParamSet, **kwargs):
    return fastopt.AdamMini(ps.named, dim=ps.dim, n_heads=ps.n_heads, **kwargs)


class _NamedModule(torch.nn.Module):
    """A module whose named_parameters() are given (pytorch-optimizer's AdamMini takes a model)."""

    def __init__(self, named):
        super().__init__()
        self._named = named

    def named_parameters(self, *args, **kwargs):
        return iter(self._named)


def _pytorch_optimizer_adam_mini(ps: ParamSet):
    from pytorch_optimizer import AdamMini

    return AdamMini(_NamedModule(ps.named), lr=1e-3, num_embeds=ps.dim, num_heads=ps.n_heads)


def _pytorch_optimizer_muon(ps):
    """pytorch-optimizer's Muon on all matrices (its ns_method="gram_newton_schulz" took 24x longer than its
    default on the tiny preset here: not a useful row)."""
    from pytorch_optimizer import Muon

    return Muon([{"params": list(ps), "use_muon": True}])


class _RootEquations(torch.optim.Optimizer):
    """ROOT's matrix step as the official code computes it, one parameter at a time, in fp32: B ← μB + g,
    M = g + μB, ε = the 0.9-quantile of |M| from two ``kthvalue`` order statistics + 1e-9, the kept part
    M − sign(M)·relu(|M| − ε), NS with ROOT's coefficients, p ← p(1 − η·0.1) − 0.2√max(m, n)·η·NS.
    (ROOT has no package to compare against.)"""

    def __init__(self, params, lr=1e-3, momentum=0.95):
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(mu).add_(p.grad)
                m = p.grad.add(buf, alpha=mu)
                flat = m.abs().flatten()
                index = 0.9 * (flat.numel() - 1)
                low, high = flat.kthvalue(int(index) + 1).values, flat.kthvalue(math.ceil(index) + 1).values
                eps = torch.lerp(low, high, index - int(index)) + 1e-9
                kept = m - m.sign() * torch.relu(m.abs() - eps)
                direction = reference.newton_schulz(kept, schedule("root", 5, kept.shape)[0], 1e-7)
                p.mul_(1 - lr * 0.1).add_(direction, alpha=-0.2 * math.sqrt(max(p.shape)) * lr)


def _soap_benchmark(precondition_frequency: int, state_dtypes=("fp32", "bf16", "fp8")) -> "Benchmark":
    frequency = dict(precondition_frequency=precondition_frequency)
    return Benchmark(fastopt.SOAP, frequency, peers=[
        _peer("pytorch_optimizer.SOAP", "pytorch_optimizer", "SOAP", max_precondition_dim=10000, **frequency),
        _peer("heavyball.SOAP", "heavyball", "SOAP", max_precond_dim=10000, **frequency)],
        hidden_matrices=True, presets=("gpt124m",), max_rounds=3, state_dtypes=state_dtypes)


def _kron_benchmark(max_size_triangular: int) -> "Benchmark":
    options = dict(preconditioner_update_probability=1.0, max_size_triangular=max_size_triangular)
    return Benchmark(fastopt.Kron, options, peers=[
        _peer("pytorch_optimizer.Kron", "pytorch_optimizer", "Kron", **options),
        _peer("timm.optim.Kron", "timm.optim.kron", "Kron", **options),
        _peer("heavyball.PSGDKron", "heavyball", "PSGDKron", **options)],
        hidden_matrices=True, presets=("gpt124m",), max_rounds=3, state_dtypes=("fp32", "bf16"))


@dataclass
class Benchmark:
    """One table: a fastopt optimizer (class or factory, and keywords) and its peers, (label, factory,
    available). ``hidden_matrices``: the preset's 2-D matrices but the embeddings (Muon's share of a
    model); ``presets`` / ``max_rounds``: what ``--preset all`` runs and a cap on ``--rounds``, for the
    optimizers whose steps take seconds here; ``state_dtypes``: the state formats the optimizer takes."""

    make: Callable
    kwargs: dict = field(default_factory=dict)
    peers: list = field(default_factory=list)
    hidden_matrices: bool = False
    presets: tuple = ("gpt124m", "large")
    max_rounds: int = 1000
    state_dtypes: tuple = ("fp32", "bf16", "fp8")


BENCHMARKS = {
    "adamw": Benchmark(fastopt.AdamW, peers=[
        ("torch.optim.AdamW foreach", lambda ps: torch.optim.AdamW(ps, foreach=True), True),
        ("torch.optim.AdamW fused", lambda ps: torch.optim.AdamW(ps, fused=True), True)]),
    "lion": Benchmark(fastopt.Lion, peers=[
        _peer("lion_pytorch.Lion", "lion_pytorch", "Lion"),
        _peer("pytorch_optimizer.Lion foreach", "pytorch_optimizer", "Lion", foreach=True),
        _peer("timm.optim.Lion foreach", "timm.optim", "Lion", foreach=True)]),
    "mars": Benchmark(fastopt.MARS, peers=[
        _peer("pytorch_optimizer.MARS foreach", "pytorch_optimizer", "MARS", foreach=True),
        _peer("timm.optim.Mars", "timm.optim", "Mars")]),
    "sophia": Benchmark(fastopt.Sophia, peers=[
        ("pytorch_optimizer.SophiaH foreach", _sophia_h, _installed("pytorch_optimizer"))]),
    "adam-mini": Benchmark(_fastopt_adam_mini, peers=[
        ("pytorch_optimizer.AdamMini", _pytorch_optimizer_adam_mini, _installed("pytorch_optimizer"))]),
    "muon": Benchmark(fastopt.Muon, peers=[
        ("torch.optim.Muon", lambda ps: torch.optim.Muon(ps), True),
        ("pytorch_optimizer.Muon", _pytorch_optimizer_muon, _installed("pytorch_optimizer"))],
        hidden_matrices=True, presets=("gpt124m",), max_rounds=5),
    # 5 Newton-Schulz steps, as the peer takes (fastopt.Scion's default is 10)
    "scion": Benchmark(fastopt.Scion, dict(ns_steps=5), peers=[_peer("pytorch_optimizer.SCION", "pytorch_optimizer",
                                                                      "SCION")],
                       hidden_matrices=True, presets=("gpt124m",), max_rounds=5),
    # fp32 Newton-Schulz, as the official code runs it (fastopt.ROOT's default is bf16)
    "root": Benchmark(fastopt.ROOT, dict(ns_dtype="fp32"), peers=[("official ROOT equations, per-param loop",
                                                                   _RootEquations, True)],
                      hidden_matrices=True, presets=("gpt124m",), max_rounds=3),
    # SOAP's first (warm-up) step builds the eigenbases; no timed step refreshes them at precondition_frequency
    # 10 (--rounds ≤ 3); "soap-refresh" refreshes at every step, so the amortised cost of a step is
    # soap + (soap-refresh − soap) / 10. Every row rotates every dimension up to 10000 (heavyball's default
    # 2048 would leave the 3072-wide ones unrotated)
    "soap": _soap_benchmark(10),
    "soap-refresh": _soap_benchmark(1, state_dtypes=("fp32",)),
    # SOAP on blocks of 256 (partition_block_size; no PyPI peer partitions), against fastopt's whole-tensor SOAP
    "soap-blocks": Benchmark(fastopt.SOAP, dict(precondition_frequency=10, partition_block_size=256), peers=[
        ("fastopt SOAP whole tensors fp32", lambda ps: fastopt.SOAP(ps, precondition_frequency=10), True)],
        hidden_matrices=True, presets=("gpt124m",), max_rounds=3),
    # every timed step updates the preconditioner (probability 1, kron_torch's first 500 steps); every row
    # with the same factor layout: triangular up to 8192 (kron_torch's default: the 3072-wide dimensions get
    # 3072² triangles) or up to 2048 (timm's and heavyball's default: those dimensions diagonal)
    "kron": _kron_benchmark(8192),
    "kron-2048": _kron_benchmark(2048),
    "cautious-adamw": Benchmark(fastopt.AdamW, dict(cautious=True), peers=[
        _peer("timm.optim.AdamWLegacy caution foreach", "timm.optim", "AdamWLegacy", caution=True, foreach=True)]),
    "cautious-lion": Benchmark(fastopt.Lion, dict(cautious=True), peers=[
        _peer("pytorch_optimizer.Lion cautious foreach", "pytorch_optimizer", "Lion", cautious=True, foreach=True),
        _peer("timm.optim.Lion caution foreach", "timm.optim", "Lion", caution=True, foreach=True)]),
    "cautious-mars": Benchmark(fastopt.MARS, dict(cautious=True), peers=[
        _peer("pytorch_optimizer.MARS cautious foreach", "pytorch_optimizer", "MARS", cautious=True, foreach=True),
        _peer("timm.optim.Mars caution", "timm.optim", "Mars", caution=True)]),
}


ADAMW_SCALE = "(scale) fastopt AdamW"  # the row every other table measures its cost against


def configurations(name: str, device: torch.device, include_slow: bool):
    """(label, factory, is_peer) for every configuration of benchmark ``name`` that can run on ``device``."""
    bench = BENCHMARKS[name]
    configs = [(label, make, True) for label, make, available in bench.peers if available]
    for backend in ("cuda", "triton", "cpu", "torch"):
        if not backends.probe(backend).available or not backends.runs_on(backend, device):
            continue
        if backend == "torch" and not include_slow:
            continue
        for state_dtype in bench.state_dtypes:
            configs.append((f"fastopt {backend} {state_dtype}", lambda ps, b=backend, s=state_dtype: bench.make(
                ps, backend=b, state_dtype=s, **bench.kwargs), False))
        if name != "adamw" and not any(label.startswith(ADAMW_SCALE) for label, _, _ in configs):
            configs.append((f"{ADAMW_SCALE} {backend} fp32", lambda ps, b=backend: fastopt.AdamW(ps, backend=b),
                            False))
    return configs


def moved_bytes(params, optimizer) -> int:
    """Bytes a perfect fused step moves: params and state read and written once, grads read."""
    total = 0
    for p in params:
        total += 3 * p.numel() * p.element_size()
        for name, t in optimizer.state[p].items():
            if isinstance(t, torch.Tensor) and name != "step":
                total += 2 * t.numel() * t.element_size()
    return total


def state_bytes(params, optimizer) -> int:
    return sum(tensor_bytes(optimizer.state[p]) for p in params)


def run(name: str, preset: str, device: torch.device, rounds: int, include_slow: bool) -> dict:
    torch.manual_seed(0)
    params = ParamSet(PRESETS[preset](), device, BENCHMARKS[name].hidden_matrices)
    rounds = min(rounds, BENCHMARKS[name].max_rounds)
    grads = [torch.randn_like(p) * 1e-3 for p in params]

    def with_grads(opt):
        """opt.step, the grads put back first: heavyball sets p.grad to None after its step."""
        for p, g in zip(params, grads):
            p.grad = g
        return opt.step

    n = sum(p.numel() for p in params)
    bandwidth = Bandwidth(device)
    configs = configurations(name, device, include_slow)
    optimizers = [(label, make(params)) for label, make, _ in configs]
    peers = [label for label, _, is_peer in configs if is_peer]
    times = {label: [] for label, _ in optimizers}
    for label, opt in optimizers:  # warm-up: state allocation, JIT builds, autotuning
        with_grads(opt)()
    for r in range(rounds):
        bandwidth.sample()
        for label, opt in optimizers:
            if label.startswith("fastopt torch") and r >= 3:
                continue  # the reference backend is slow; three samples suffice
            times[label].append(timed(with_grads(opt), device))
    fastest_peer = min((statistics.median(times[label]) for label in peers), default=None)
    adamw = next((statistics.median(times[label]) for label in times if label.startswith(ADAMW_SCALE)), None)
    rows = []
    for label, opt in optimizers:
        t = statistics.median(times[label])
        gbps = moved_bytes(params, opt) / t / 1e9
        rows.append({"config": label, "ms_per_step": t * 1e3, "params_per_s": n / t, "effective_GBps": gbps,
                     "bandwidth_fraction": gbps / bandwidth.best,
                     "speedup_vs_fastest_peer": fastest_peer / t if fastest_peer else None,
                     "cost_vs_fastopt_adamw": t / adamw if adamw else None,
                     "state_bytes_per_param": state_bytes(params, opt) / n})
    return {"optimizer": name, "preset": preset, "device": str(device), "params": n, "tensors": len(params),
            "threads": torch.get_num_threads(), "bandwidth_GBps": bandwidth.best, "rounds": rounds, "rows": rows}


def format_table(result: dict) -> str:
    head = (f"{result['optimizer']}, preset {result['preset']}: {result['params'] / 1e6:.1f}M params in "
            f"{result['tensors']} tensors, {result['device']}, {result['threads']} threads, in-place-add bandwidth "
            f"{result['bandwidth_GBps']:.1f} GB/s (best sample), median of {result['rounds']} interleaved steps\n")
    lines = ["| optimizer | ms/step | Mparams/s | GB/s | % of bandwidth | vs fastest peer | × AdamW step | "
             "state B/param |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        speedup = "n/a (no peer)" if r["speedup_vs_fastest_peer"] is None else f"{r['speedup_vs_fastest_peer']:.2f}x"
        cost = "—" if r["cost_vs_fastopt_adamw"] is None else f"{r['cost_vs_fastopt_adamw']:.1f}"
        lines.append(f"| {r['config']} | {r['ms_per_step']:.1f} | {r['params_per_s'] / 1e6:.0f} | "
                     f"{r['effective_GBps']:.1f} | {100 * r['bandwidth_fraction']:.0f}% | {speedup} | {cost} | "
                     f"{r['state_bytes_per_param']:.2f} |")
    return head + "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastopt bench step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", default="all", choices=[*BENCHMARKS, "all"])
    parser.add_argument("--preset", default="all", choices=[*PRESETS, "all"])
    add_common_arguments(parser, rounds=15)
    parser.add_argument("--include-torch-backend", action="store_true",
                        help="also time fastopt's plain-torch reference backend (slow)")
    args = parser.parse_args(argv)
    results = []
    names = list(BENCHMARKS) if args.optimizer == "all" else [args.optimizer]
    for name in names:
        for preset in BENCHMARKS[name].presets if args.preset == "all" else [args.preset]:
            result = run(name, preset, torch.device(args.device), args.rounds, args.include_torch_backend)
            print(format_table(result) + "\n", flush=True)
            results.append(result)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
