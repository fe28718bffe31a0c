"""The quantile soft-threshold of ROOT: ``clamp_to_quantile(x, q=0.9, offset=1e-9, backend="auto", out_dtype=None,
with_norm=False)`` → ``(clamped, threshold)``, or ``(clamped, threshold, norm)`` with ``with_norm``.

ROOT (He et al. 2025, huawei-noah/noah-research ROOT/) filters each momentum matrix M before orthogonalising
it: ε = quantile(|M|, q) + offset, and the part it orthogonalises, M − sign(M)·max(|M| − ε, 0), is
clamp(M, −ε, ε).

Per matrix (a (m, n) tensor, or each matrix of a (B, m, n) batch), in the compute dtype c (float64 for float64
input, else float32; |x| is exact in it), with N = m·n:

    r = q_c · (N − 1)  in float64, q_c = q rounded to c                      (torch.quantile's rank; the torch
                                                  of 2.11 rounds r to c: linear_rank follows the installed one)
    lo, hi = the floor(r)-th and ceil(r)-th smallest |x| (0-based);  w = r − floor(r) rounded to c
    threshold = torch.lerp(lo, hi, w) + offset  in c  (lerp: fma(w, hi − lo, lo) if w < 0.5
                                                       else fma(w − 1, hi − lo, hi), rounded once)
    clamped = clamp(x, −threshold, threshold)  in c, cast to out_dtype (default x.dtype)
    norm = ‖clamped‖_F  (float64; of the values as returned, in out_dtype)

The norm is what Newton-Schulz divides by (ROOT passes it on: fastopt.ops.newton_schulz(..., norm=)), so the clamp,
the cast to NS's dtype and the norm are one pass over the matrix on the GPU backends. There every chunk of the
clamp pass sums (clamped / threshold)² (each ≤ 1: no overflow) and norm = threshold·√(Σ over the chunks), NaN where
the threshold is NaN or infinite; cpu and torch reduce the clamped tensor (float64 where float32 overflows).

so the threshold is ``torch.quantile(|x|.to(c), q, interpolation="linear") + offset`` bit for bit, and the same
formula holds past torch.quantile's limit of 2^24 elements. NaN: a matrix holding a NaN gets a NaN threshold (as
torch.quantile gives), hence an all-NaN clamped output. ±inf are ordinary values of the order; like torch.lerp, a
quantile that lands on +inf (lo = hi = inf, or w ≥ 0.5 with hi = inf) is NaN.

Backends (the results are identical):

* ``torch``: the readable reference, any device: sort each matrix, gather the two order statistics, torch.lerp.
* ``cpu``: matrices of up to ``KTHVALUE_MAX_ELEMENTS`` (2^14): two batched ``torch.kthvalue`` calls over chunks of
  them (ROOT's small matrices: one call per chunk instead of a radix select each; the tiny Llama's ROOT step 6.5 →
  5.2 ms). Larger ones: radix select on the bit patterns of |x| (non-negative floats order like their bits), 16-bit
  digits from the top: per digit one ``torch.bincount`` histogram, its cumsum and a search give the bucket that
  holds the rank and the rank inside it; the elements of that bucket are the next digit's input. float32 takes two
  digits (the second on the few elements of one bucket), bf16 / fp16 one (their 15-bit keys are the whole value),
  float64 four. Both ranks share the passes until their buckets differ. Measured on this 2-core Zen 4 for one
  768x3072 float32 matrix, q = 0.9, threshold and clamp, side by side in one process (best of 12; 1 thread / 2
  threads): this 6.9 / 4.6 ms; torch.quantile 52 / 45 ms; two kthvalue 59 / 58 ms; one kthvalue + a count + a masked
  min for the upper neighbour 51 / 43 ms; the torch backend (a sort) 263 / 247 ms. (numpy's partition of one rank
  plus the min of the rest took 13 ms, and numpy is no dependency of fastopt.)
* ``triton``: the same radix select on the GPU in one pass per 11-bit digit, batched over the matrices, then one
  fused pass computes the threshold and writes the clamp (fastopt.triton_kernels.select); no host synchronisation.
  float32, bf16 and float16 input, float32 / bf16 / float16 output. CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1``.
* ``cuda``: the same radix select in CUDA C++ (csrc/cuda/quantile_select.cu, ``fastopt::quantile_clamp_``): one
  launch per digit over every matrix of the batch, then the clamp launch; no host synchronisation. Unlike the
  Triton kernels, only the last block to finish a matrix (a per-matrix atomic ticket) scans its histogram and
  stores the extended prefix and rank for the next launch (after the last digit, the threshold). Under 2^32
  elements per matrix (uint32 counts); float32, bf16 and float16 in and out; CUDA tensors. Compiled for sm_80 and
  sm_90 in CI (tests/test_cuda_build.py, no register spills). On an H200 (torch 2.11) the ``cuda``-marked test
  matched torch.quantile bit for bit on its first case at q = 0 and 0.5 and missed by one ulp at q = 0.9, through
  that torch's float32 rank (now followed by ``linear_rank``); its other cases have not run on a GPU.
* ``auto``: CPU tensors → cpu; CUDA tensors → cuda where the extension runs (float64 → torch), else torch. On an
  H200 (torch 2.11, ``pytest benchmarks/test_micro_select.py``, medians) the cuda kernel took 103 / 112 / 235 µs
  for 768x768, 768x3072 and 8x768x3072 fp32, the torch backend's sort 269 / 297 / 1632 µs, and the Triton select
  405 / 647 / 2848 µs (every one of its programs scans the 2048-bin histogram of the previous digit), so ``auto``
  never picks triton; the fused norm cost the cuda kernel 0-7%.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch

from ..backends import probe, triton_interpreting
from ..reference.update import compute_dtype

QC_BACKENDS = ("auto", "cpu", "torch", "triton", "cuda")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# the cpu backend selects in matrices of up to KTHVALUE_MAX_ELEMENTS with torch.kthvalue, batched in chunks of about
# KTHVALUE_CHUNK_ELEMENTS (measured here: 8 matrices of 4096 in 0.16 ms, against 1.7 ms for the radix select one
# matrix at a time; past ~2^16 elements per call kthvalue slows down superlinearly and the radix select wins)
KTHVALUE_MAX_ELEMENTS = 2**14
KTHVALUE_CHUNK_ELEMENTS = 2**16
# the CPU radix select: (key dtype, digit shifts from the top) per input dtype; keys are the bits of |x| in x's own
# format (the sign bit cleared), so a 16-bit format takes one digit
_CPU_KEYS = {torch.float64: (torch.int64, (48, 32, 16, 0)), torch.float32: (torch.int32, (16, 0)),
             torch.bfloat16: (torch.int16, (0,)), torch.float16: (torch.int16, (0,))}


@functools.cache
def quantile_rank_in_float64() -> bool:
    """Whether the installed torch.quantile computes its rank q·(n − 1) of float32 input in float64 (torch 2.14.1)
    or rounds it to float32 (torch 2.11.0). Told apart on 8190 zeros and 910 ones at q = 0.9, where the quantile is
    w itself: 0.0997831 (float64 rank 8189.0997831) or 0.0996094 (the rank rounded to float32, 8189.0996094)."""
    x = torch.zeros(9100)
    x[8190:] = 1
    return torch.quantile(x, 0.9).item() != 0.099609375


def linear_rank(n: int, q: float, dtype: torch.dtype) -> tuple[int, int, float]:
    """torch.quantile's linear interpolation point among n sorted values: (floor r, ceil r, w) with
    r = q_c·(n − 1) in float64 (rounded to ``dtype`` where the installed torch does that: quantile_rank_in_float64),
    q_c = q rounded to ``dtype``, and w = r − floor r rounded to ``dtype``."""
    r = torch.tensor(q, dtype=dtype).item() * (n - 1)
    if dtype != torch.float64 and not quantile_rank_in_float64():
        r = torch.tensor(r, dtype=torch.float64).to(dtype).item()
    lo = math.floor(r)
    return lo, math.ceil(r), torch.tensor(r - lo, dtype=torch.float64).to(dtype).item()


@torch.no_grad()
def clamp_to_quantile(x: torch.Tensor, q: float = 0.9, offset: float = 1e-9, backend: str = "auto",
                      out_dtype: torch.dtype | None = None, with_norm: bool = False) -> tuple[torch.Tensor, ...]:
    """(clamp(x, −t, t) in ``out_dtype``, t) with t = quantile(|x|, q) + offset per matrix (see the module docstring),
    and with ``with_norm`` the Frobenius norm of each clamped matrix third. t has shape () for a (m, n) input, (B,)
    for (B, m, n); float64 for float64 input, else float32. The norm: that shape, float64."""
    _check(x, q, offset, out_dtype)
    out_dtype = out_dtype or x.dtype
    backend = _resolve(backend, x, out_dtype)
    c = compute_dtype(x)
    batch = x.reshape(-1, *x.shape[-2:])
    lo, hi, w = linear_rank(batch[0].numel(), q, c)
    clamped = torch.empty(batch.shape, dtype=out_dtype, device=x.device)
    norm = None
    if backend == "triton":
        from ..triton_kernels.select import quantile_clamp as launch

        threshold, norm = launch(batch.contiguous(), clamped, lo, hi, w, offset, with_norm)
    elif backend == "cuda":
        threshold = torch.empty(batch.shape[0], dtype=torch.float32, device=x.device)
        norm = torch.empty(batch.shape[0], dtype=torch.float64, device=x.device) if with_norm else None
        torch.ops.fastopt.quantile_clamp_(batch.contiguous(), clamped, threshold, norm, lo, hi, w, offset)
    elif backend == "cpu":
        threshold = _cpu(batch, lo, hi, w, c, offset, clamped)
    else:
        threshold = _torch_threshold(batch, lo, hi, w, c) + offset
        bound = threshold.view(-1, 1, 1)
        # in c (the batched bound sets the type), cast to out_dtype on the write
        torch.clamp(batch, -bound, bound, out=clamped)
    clamped, threshold = clamped.view(x.shape), threshold.view(x.shape[:-2])
    if not with_norm:
        return clamped, threshold
    return clamped, threshold, (_frobenius(clamped) if norm is None else norm.view(x.shape[:-2]))


def _frobenius(x: torch.Tensor) -> torch.Tensor:
    """‖x‖_F per matrix in float64: off the CPU reduced in float64 (no host synchronisation, as newton_schulz's own
    norm); on the CPU in float32 (float64 input: float64) unless that overflows."""
    if x.device.type != "cpu":
        return torch.linalg.vector_norm(x, dim=(-2, -1), dtype=torch.float64)
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), dtype=compute_dtype(x))
    if not torch.isfinite(norm).all():
        norm = torch.linalg.vector_norm(x, dim=(-2, -1), dtype=torch.float64)
    return norm.double()


def _check(x, q, offset, out_dtype) -> None:
    if not isinstance(x, torch.Tensor) or x.layout != torch.strided or x.ndim not in (2, 3) \
            or not x.is_floating_point():
        raise ValueError("clamp_to_quantile takes a dense real floating-point (m, n) or (B, m, n) tensor, got "
                         f"{type(x).__name__} {getattr(x, 'dtype', '')} {getattr(x, 'layout', '')} "
                         f"{tuple(getattr(x, 'shape', ()))}")
    if x.numel() == 0:
        raise ValueError(f"clamp_to_quantile: empty matrices have no quantile, got shape {tuple(x.shape)}")
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 <= q <= 1:
        raise ValueError(f"clamp_to_quantile: q must be a number in [0, 1], got {q!r}")
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not offset >= 0:
        raise ValueError(f"clamp_to_quantile: offset must be a number >= 0, got {offset!r}")
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point):
        raise ValueError(f"clamp_to_quantile: out_dtype must be a real floating-point dtype, got {out_dtype!r}")


def _resolve(backend: str, x: torch.Tensor, out_dtype: torch.dtype) -> str:
    if backend not in QC_BACKENDS:
        raise ValueError(f"backend must be one of {QC_BACKENDS}, got {backend!r}")
    device = x.device
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"clamp_to_quantile backend 'cpu' needs CPU tensors, got {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"clamp_to_quantile backend 'cuda' needs CUDA tensors, got {device}; the cpu and "
                         "torch backends run on CPU tensors")
    if backend in ("triton", "cuda"):
        if x.dtype not in TRITON_DTYPES or out_dtype not in TRITON_DTYPES:
            elsewhere = "cpu or torch backend" if device.type == "cpu" else "torch backend"
            raise ValueError(f"clamp_to_quantile backend {backend!r} takes and returns float32, bfloat16 or float16 "
                             f"(it selects on float32 keys), got {x.dtype} -> {out_dtype}; float64 runs on the "
                             f"{elsewhere}")
        if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
            raise ValueError(f"clamp_to_quantile backend 'triton' needs CUDA tensors, or CPU tensors under "
                             f"TRITON_INTERPRET=1, got {device}")
        if device.type == "cuda" and not probe(backend).available:
            raise RuntimeError(f"clamp_to_quantile backend {backend!r} is not available: {probe(backend).reason}")
        return backend
    if backend != "auto":
        return backend
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":  # float64: the kernels select on fp32 keys; the Triton select is slower than a sort
        fits = x.dtype in TRITON_DTYPES and out_dtype in TRITON_DTYPES
        return "cuda" if fits and probe("cuda").available else "torch"
    _warn_torch_fallback(device)
    return "torch"


_WARNED = set()


def _warn_torch_fallback(device: torch.device) -> None:
    if device.type not in _WARNED:
        _WARNED.add(device.type)
        warnings.warn(f"fastopt: clamp_to_quantile has no kernel for {device.type} tensors; running the torch "
                      "reference (a sort per matrix)", RuntimeWarning, stacklevel=4)


def _finish(lo: torch.Tensor, hi: torch.Tensor, w: float, has_nan: torch.Tensor) -> torch.Tensor:
    """torch.lerp(lo, hi, w), NaN where the matrix holds a NaN (lo, hi, has_nan: (B,))."""
    t = torch.lerp(lo, hi, torch.full_like(lo, w))
    return t.masked_fill(has_nan, float("nan"))


def _torch_threshold(batch, lo, hi, w, c) -> torch.Tensor:
    """The reference: sort |x| of each matrix and read the two order statistics."""
    flat = batch.flatten(1)
    ordered = flat.abs().to(c).sort(dim=1).values
    return _finish(ordered[:, lo], ordered[:, hi], w, flat.isnan().any(1))


def _cpu(batch, lo, hi, w, c, offset, clamped) -> torch.Tensor:
    """The order statistics lo and hi of |x| per matrix (small matrices: ``torch.kthvalue`` on chunks of them; larger
    ones: radix select on the bits of |x|, one matrix at a time; see the module docstring), then the clamp; returns
    the thresholds."""
    flat = batch.flatten(1)
    n = flat.shape[1]
    small = n <= KTHVALUE_MAX_ELEMENTS
    if small:
        picked = torch.cat([torch.stack([rows.abs().kthvalue(k + 1, dim=1).values for k in (lo, hi)], 1)
                            for rows in flat.split(max(1, KTHVALUE_CHUNK_ELEMENTS // n))]).to(c)
    else:
        key_dtype, shifts = _CPU_KEYS[batch.dtype]
        found = [_select_keys(bits, sorted({lo, hi}), shifts) for bits in flat.view(key_dtype)]
        picked = torch.tensor([[f[lo], f[hi]] for f in found], dtype=key_dtype).view(batch.dtype).to(c)
    threshold = _finish(picked[:, 0], picked[:, 1], w, flat.amax(1).isnan()) + offset  # amax propagates NaN
    # clamp commutes with rounding to nearest: rounding x and ±t to out_dtype first gives the same result
    if small:  # one clamp for the stack (per-call overhead dominates)
        bound = threshold.view(-1, 1, 1)
        torch.clamp(batch, -bound, bound, out=clamped)
    else:  # a scalar bound per matrix: 6x faster here than a broadcast tensor bound
        for matrix, out, t in zip(batch, clamped, threshold.tolist()):
            torch.clamp(matrix.to(out.dtype), -t, t, out=out)
    return threshold


def _select_keys(bits: torch.Tensor, ranks: list[int], shifts: tuple[int, ...]) -> dict[int, int]:
    """{rank: key} for the 0-based ``ranks`` among the keys (the sign bit cleared) of the float bit patterns ``bits``
    (1-D), one 16-bit digit at a time from the top (``shifts``: the low bit of each digit; the top digit has 15 bits).
    The candidates of the next digit are the elements of the bucket that holds the rank."""
    shift, rest = shifts[0], shifts[1:]
    mask = 0x7FFF if shift + 16 == bits.element_size() * 8 else 0xFFFF  # the top digit drops the sign bit
    if shift:  # torch.bitwise_right_shift: 3x faster here than the >> operator; masked in place
        digits = torch.bitwise_right_shift(bits, shift).bitwise_and_(mask)
    else:
        digits = bits & mask
    cum = torch.bincount(digits, minlength=1 << 16).cumsum(0)
    buckets = torch.searchsorted(cum, torch.tensor(ranks), right=True).tolist()
    found = {}
    for bucket in set(buckets):
        inside = {k: k - (int(cum[bucket - 1]) if bucket else 0) for k, b in zip(ranks, buckets) if b == bucket}
        low = _select_keys(bits[digits == bucket], sorted(set(inside.values())), rest) if rest else {}
        for k, r in inside.items():
            found[k] = (bucket << shift) | low.get(r, 0)
    return found
