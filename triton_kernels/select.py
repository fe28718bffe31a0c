"""Exact order statistics of |x| per matrix in Triton, by radix select, and the quantile clamp of ROOT built on
them (``quantile_clamp``; the op is fastopt.ops.clamp_to_quantile, which computes the ranks).

Per matrix b of a (B, m, n) input x, N = m·n elements, given the ranks k_lo ≤ k_hi ≤ k_lo + 1 and the weight w:

    key(v) = the uint32 bits of |v| as fp32 (non-negative floats order like their bit patterns); NaN → 0xFFFFFFFF
    lo, hi = the values of the k_lo-th and k_hi-th smallest keys (0-based)
    t = NaN if the matrix holds a NaN, else torch.lerp(lo, hi, w) + offset          (fp32, see _lerp)
    out = clamp(x, −t, t) cast to out's dtype (fp32 / bf16 / fp16)
    partial[b, chunk] = Σ over the chunk of (out / t)²  (0 where t = 0 or t is NaN: then out is 0 or NaN)

from which the launcher forms ‖out[b]‖_F = t·√Σ partial[b, :] where asked (Frobenius norm that cannot overflow:
every |out / t| ≤ 1; NaN where t is NaN or infinite).

Radix select: a key is cut into digits from the top, 11 bits wide (fp32: 11 + 11 + 10; bf16 and fp16 keys end in
16 and 13 zero bits: 11 + 5 and 11 + 8). Launch p (one program per CHUNK elements of one matrix, all matrices in one
grid) histograms digit p of the keys whose higher digits equal the prefix found so far (tl.histogram per program,
then atomics into the matrix's global histogram). Each program of launch p + 1 first scans that histogram
(``_find``: cumsum, the bucket that holds the rank, the rank inside it), which extends the prefix by digit p; its
chunk-0 program stores the prefix and rank for the launch after. Both ranks keep their own prefix (they share
pass 1's histogram; with k_hi = k_lo the second one is skipped). After the last digit the prefix is the key: the
last launch finds it, computes t, and writes the clamp. P + 1 launches (P = 3 for fp32 input, 2 for bf16 / fp16)
after zeroing the histograms, each reading x once, the last also writing out; no host synchronisation.
"""
import torch
import triton
import triton.language as tl

CHUNK = 4096          # elements per program
NUM_WARPS = 8
DIGIT_BITS = 11       # widest digit: MAX_BINS bins
MAX_BINS = 1 << DIGIT_BITS
NAN_BIN = MAX_BINS - 1  # the first digit of the NaN key; finite and infinite keys have first digits <= 0x3FC
_MAX_BINS, _NAN_BIN = tl.constexpr(MAX_BINS), tl.constexpr(NAN_BIN)
F32, BF16, F16 = 0, 1, 2  # OUT constexpr: the output format
_F32, _BF16, _F16 = tl.constexpr(F32), tl.constexpr(BF16), tl.constexpr(F16)
_FMT = {torch.float32: F32, torch.bfloat16: BF16, torch.float16: F16}
_LOW_BIT = {torch.float32: 0, torch.bfloat16: 16, torch.float16: 13}  # lowest bit a key of that dtype can set


def digits(dtype: torch.dtype) -> list[tuple[int, int]]:
    """(shift, bits) of each digit of the keys of ``dtype`` input, from the top."""
    out, top = [], 32
    while top > _LOW_BIT[dtype]:
        shift = max(top - DIGIT_BITS, _LOW_BIT[dtype])
        out.append((shift, top - shift))
        top = shift
    return out


@triton.jit
def _keys(x):
    """uint32 keys of |x| (x: fp32) that order like the values; NaN → 0xFFFFFFFF, above +inf."""
    k = x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
    return tl.where(x != x, 0xFFFFFFFF, k)


@triton.jit
def _find(hist_row, prefix, rank, BITS: tl.constexpr):
    """(prefix·2^BITS + bucket, rank − #keys in lower buckets): the bucket of the BITS-bit digit histogram at
    hist_row that holds the 0-based ``rank``, and the rank within it."""
    # tl.reduce / tl.associative_scan with the standard combine functions rather than tl.cumsum, tl.sum, tl.max:
    # those are @jit functions decorated when triton is imported, which breaks a kernel interpreted in a process
    # that imported triton in compiled mode (the interpreter evaluates these combine functions itself)
    h = tl.load(hist_row + tl.arange(0, 1 << BITS))
    c = tl.associative_scan(h, 0, tl.standard._sum_combine)
    before = c <= rank
    bucket = tl.reduce(before.to(tl.int32), 0, tl.standard._sum_combine)
    below = tl.reduce(tl.where(before, c, 0), 0, tl.standard._elementwise_max)
    return (prefix << BITS) | bucket, rank - below


@triton.jit
def _found(hist_ptr, state_ptr, b, nmat, t, k, PASS: tl.constexpr, BITS: tl.constexpr):
    """(prefix, rank) of target t (0: k_lo, 1: k_hi) of matrix b once digit PASS (1-based) is known, from the
    histogram of pass PASS and the (prefix, rank) after pass PASS − 1 (stored by the launch before)."""
    if PASS == 1:
        prefix, rank = 0, k
        row = 0  # pass 1 histograms every key, once for both targets
    else:
        slot = state_ptr + (((PASS - 2) * nmat + b) * 2 + t) * 2
        prefix, rank = tl.load(slot), tl.load(slot + 1)
        row = t
    return _find(hist_ptr + (((PASS - 1) * nmat + b) * 2 + row) * _MAX_BINS, prefix, rank, BITS)


@triton.jit
def _histogram(keys, hist_row, match, SHIFT: tl.constexpr, BITS: tl.constexpr):
    """Adds the histogram of digit (SHIFT, BITS) of the matching keys into hist_row."""
    digit = ((keys >> SHIFT) & ((1 << BITS) - 1)).to(tl.int32)
    h = tl.histogram(digit, 1 << BITS, mask=match)
    tl.atomic_add(hist_row + tl.arange(0, 1 << BITS), h, mask=h > 0, sem="relaxed")


@triton.jit
def _target_pass(keys, valid, hist_ptr, state_ptr, b, nmat, t, k, write_state,
                 PASS: tl.constexpr, SHIFT: tl.constexpr, BITS: tl.constexpr, PREV_SHIFT: tl.constexpr,
                 PREV_BITS: tl.constexpr):
    """Pass PASS ≥ 2 for target t: find digit PASS − 1, store the state (chunk 0), histogram digit PASS."""
    prefix, rank = _found(hist_ptr, state_ptr, b, nmat, t, k, PASS - 1, PREV_BITS)
    slot = state_ptr + (((PASS - 2) * nmat + b) * 2 + t) * 2
    tl.store(slot, prefix, mask=write_state)
    tl.store(slot + 1, rank, mask=write_state)
    match = valid & ((keys >> PREV_SHIFT) == prefix.to(tl.uint32))
    _histogram(keys, hist_ptr + (((PASS - 1) * nmat + b) * 2 + t) * _MAX_BINS, match, SHIFT, BITS)


@triton.jit
def radix_histogram_kernel(x_ptr, hist_ptr, state_ptr, n, nmat, chunks, k_lo, k_hi,
                           PASS: tl.constexpr, SHIFT: tl.constexpr, BITS: tl.constexpr, PREV_SHIFT: tl.constexpr,
                           PREV_BITS: tl.constexpr, TWO: tl.constexpr, CHUNK: tl.constexpr):
    """Histogram pass PASS (1-based) of the radix select over one chunk of one matrix (see the module docstring).
    hist: int32 [passes, nmat, 2 targets, MAX_BINS], zeroed; state: int32 [passes − 1, nmat, 2 targets, 2]."""
    pid = tl.program_id(0)
    b, chunk = pid // chunks, pid % chunks
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = offs < n
    x = tl.load(x_ptr + b.to(tl.int64) * n + offs, mask=valid, other=0.0).to(tl.float32)
    keys = _keys(x)
    if PASS == 1:
        _histogram(keys, hist_ptr + b * 2 * _MAX_BINS, valid, SHIFT, BITS)
    else:
        _target_pass(keys, valid, hist_ptr, state_ptr, b, nmat, 0, k_lo, chunk == 0, PASS, SHIFT, BITS, PREV_SHIFT,
                     PREV_BITS)
        if TWO:
            _target_pass(keys, valid, hist_ptr, state_ptr, b, nmat, 1, k_hi, chunk == 0, PASS, SHIFT, BITS,
                         PREV_SHIFT, PREV_BITS)


@triton.jit
def _lerp(lo, hi, w):
    """torch.lerp(lo, hi, w) on fp32, bit for bit: fma(w, hi − lo, lo) for w < 0.5, else fma(w − 1, hi − lo, hi),
    rounded once. The fma is evaluated in fp64, where the product of two fp32 values is exact; the sum is rounded
    to odd (TwoSum gives its exact error), after which rounding to fp32 is correct (53 ≥ 24 + 2 bits; Boldo &
    Melquiond 2008). tl.fma would do on the GPU, but the interpreter evaluates it with two roundings."""
    d = hi - lo
    small = w < 0.5
    p = tl.where(small, w, w - 1.0).to(tl.float64) * d.to(tl.float64)
    base = tl.where(small, lo, hi).to(tl.float64)
    s = p + base
    bs = s - p
    err = (p - (s - bs)) + (base - bs)
    bits = s.to(tl.int64, bitcast=True)
    inexact_even = (err != 0) & ((bits & 1) == 0) & (s - s == 0)
    bits = tl.where(inexact_even, tl.where((err > 0) == (s > 0), bits + 1, bits - 1), bits)
    return bits.to(tl.float64, bitcast=True).to(tl.float32)


@triton.jit
def _bf16_bits(x):
    """fp32 → bf16 bit pattern, round to nearest even; NaN → quiet NaN."""
    u = x.to(tl.uint32, bitcast=True)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, rounded).to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def quantile_clamp_kernel(x_ptr, out_ptr, threshold_ptr, partial_ptr, hist_ptr, state_ptr, n, nmat, chunks, k_lo,
                          k_hi, weight, offset, LAST: tl.constexpr, SHIFT: tl.constexpr, BITS: tl.constexpr, TWO: tl.constexpr,
                          OUT: tl.constexpr, CHUNK: tl.constexpr):
    """The last launch: find the last digit of both keys, t = lerp(lo, hi, w) + offset (NaN if the matrix holds a
    NaN: its count is pass 1's top bin), store t (chunk 0) and clamp(x, −t, t) for one chunk of one matrix, and the
    chunk's Σ (clamp / t)² of the values as stored."""
    pid = tl.program_id(0)
    b, chunk = pid // chunks, pid % chunks
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = offs < n
    at = b.to(tl.int64) * n + offs
    x = tl.load(x_ptr + at, mask=valid, other=0.0).to(tl.float32)
    key_lo, _ = _found(hist_ptr, state_ptr, b, nmat, 0, k_lo, LAST, BITS)
    lo = (key_lo.to(tl.uint32) << SHIFT).to(tl.float32, bitcast=True)
    hi = lo
    if TWO:
        key_hi, _ = _found(hist_ptr, state_ptr, b, nmat, 1, k_hi, LAST, BITS)
        hi = (key_hi.to(tl.uint32) << SHIFT).to(tl.float32, bitcast=True)
    has_nan = tl.load(hist_ptr + b * 2 * _MAX_BINS + _NAN_BIN) > 0
    t = tl.where(has_nan, float("nan"), _lerp(lo, hi, weight)) + offset
    tl.store(threshold_ptr + b, t, mask=chunk == 0)
    y = tl.minimum(tl.maximum(x, -t, propagate_nan=tl.PropagateNan.ALL), t, propagate_nan=tl.PropagateNan.ALL)
    if OUT == _BF16:
        bits = _bf16_bits(y)
        tl.store(out_ptr + at, bits, mask=valid)
        y = (bits.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    elif OUT == _F16:
        half = y.to(tl.float16)
        tl.store(out_ptr + at, half, mask=valid)
        y = half.to(tl.float32)
    else:
        tl.store(out_ptr + at, y, mask=valid)
    inverse = tl.where(t > 0, 1.0 / t, 0.0)  # t = 0 clamps to zeros; a NaN t gives a NaN norm anyway
    ratio = tl.where(valid, y * inverse, 0.0)  # |ratio| <= 1
    tl.store(partial_ptr + pid, tl.reduce(ratio * ratio, 0, tl.standard._sum_combine))


def quantile_clamp(x: torch.Tensor, out: torch.Tensor, k_lo: int, k_hi: int, weight: float, offset: float,
                   with_norm: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Writes clamp(x, −t, t) into ``out`` and returns (t, ‖out‖_F per matrix or None): t fp32 (B,), t =
    lerp(lo, hi, weight) + offset with lo, hi the k_lo-th and k_hi-th smallest |x| of each matrix (see the module
    docstring; the ranks and the fp32 weight come from fastopt.ops.quantile_clamp.linear_rank); the norm float64
    (B,) where ``with_norm``. x: contiguous (B, m, n) fp32 / bf16 / fp16; out: (B, m, n) fp32 / bf16 / fp16. CUDA
    tensors, or CPU tensors with kernels decorated under TRITON_INTERPRET=1."""
    if x.dtype not in _FMT or out.dtype not in _FMT:
        raise TypeError(f"quantile_clamp (triton): x and out must be float32, bfloat16 or float16, got {x.dtype} "
                        f"and {out.dtype}")
    if x.ndim != 3 or out.shape != x.shape or not x.is_contiguous() or not out.is_contiguous() \
            or out.device != x.device:
        raise ValueError(f"quantile_clamp (triton): x and out must be contiguous (B, m, n) tensors of one shape and "
                         f"device, got {tuple(x.shape)} {x.device} and {tuple(out.shape)} {out.device}")
    if x.device.type != "cuda" and isinstance(radix_histogram_kernel, triton.runtime.JITFunction):
        raise ValueError(f"quantile_clamp (triton): tensors are on {x.device}; the compiled kernels need CUDA tensors "
                         "(CPU tensors run only under TRITON_INTERPRET=1)")
    nmat, n = x.shape[0], x[0].numel()
    if not 0 <= k_lo <= k_hi <= min(k_lo + 1, n - 1) or n > (1 << 31) - CHUNK:
        raise ValueError(f"quantile_clamp (triton): ranks {k_lo}, {k_hi} out of range for {n} elements per matrix "
                         "(int32 offsets: at most 2^31 − CHUNK)")
    schedule = digits(x.dtype)
    hist = torch.zeros(len(schedule) * nmat * 2 * MAX_BINS, dtype=torch.int32, device=x.device)
    state = torch.empty((len(schedule) - 1) * nmat * 2 * 2, dtype=torch.int32, device=x.device)
    threshold = torch.empty(nmat, dtype=torch.float32, device=x.device)
    chunks = triton.cdiv(n, CHUNK)
    partial = torch.empty(nmat * chunks, dtype=torch.float32, device=x.device)
    grid = (nmat * chunks,)
    two = k_hi != k_lo
    for p, (shift, bits) in enumerate(schedule, 1):
        prev_shift, prev_bits = schedule[p - 2] if p > 1 else (0, 0)
        radix_histogram_kernel[grid](x, hist, state, n, nmat, chunks, k_lo, k_hi, PASS=p, SHIFT=shift, BITS=bits,
                                     PREV_SHIFT=prev_shift, PREV_BITS=prev_bits, TWO=two, CHUNK=CHUNK,
                                     num_warps=NUM_WARPS)
    shift, bits = schedule[-1]
    quantile_clamp_kernel[grid](x, out.view(torch.int16) if out.dtype == torch.bfloat16 else out, threshold, partial,
                                hist, state, n, nmat, chunks, k_lo, k_hi, float(weight), float(offset), LAST=len(schedule),
                                SHIFT=shift, BITS=bits, TWO=two, OUT=_FMT[out.dtype], CHUNK=CHUNK,
                                num_warps=NUM_WARPS)
    if not with_norm:
        return threshold, None
    return threshold, threshold.double() * partial.view(nmat, chunks).double().sum(1).sqrt()


def compile_specs():
    """(name, jit_fn, signature, constexprs) for every shipped configuration: each histogram pass and the clamp
    pass (for each output dtype) of the fp32, bf16 and fp16 schedules, following two ranks; and the fp32 schedule
    following one rank (k_hi = k_lo: the same code less the second rank's). Compile with num_warps=NUM_WARPS."""
    ptr = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    scalars = {"n": "i32", "nmat": "i32", "chunks": "i32", "k_lo": "i32", "k_hi": "i32"}
    specs = []
    for dtype, two in ((torch.float32, True), (torch.bfloat16, True), (torch.float16, True), (torch.float32, False)):
        schedule = digits(dtype)
        ranks = "" if two else "_one_rank"
        for p, (shift, bits) in enumerate(schedule, 1):
            if p == 1 and not two:  # pass 1 histograms every key once, whatever the number of ranks
                continue
            prev_shift, prev_bits = schedule[p - 2] if p > 1 else (0, 0)
            c = dict(PASS=p, SHIFT=shift, BITS=bits, PREV_SHIFT=prev_shift, PREV_BITS=prev_bits, TWO=two,
                     CHUNK=CHUNK)
            sig = {"x_ptr": ptr[dtype], "hist_ptr": "*i32", "state_ptr": "*i32", **scalars}
            specs.append((f"histogram_{name[dtype]}_pass{p}{ranks}", radix_histogram_kernel,
                          {**sig, **{k: "constexpr" for k in c}}, c))
        shift, bits = schedule[-1]
        for out_dtype in (torch.float32, torch.bfloat16, torch.float16) if two else (torch.float32,):
            c = dict(LAST=len(schedule), SHIFT=shift, BITS=bits, TWO=two, OUT=_FMT[out_dtype], CHUNK=CHUNK)
            sig = {"x_ptr": ptr[dtype], "out_ptr": "*i16" if out_dtype == torch.bfloat16 else ptr[out_dtype],
                   "threshold_ptr": "*fp32", "partial_ptr": "*fp32", "hist_ptr": "*i32", "state_ptr": "*i32",
                   **scalars, "weight": "fp32", "offset": "fp32"}
            specs.append((f"clamp_{name[dtype]}_to_{name[out_dtype]}{ranks}", quantile_clamp_kernel,
                          {**sig, **{k: "constexpr" for k in c}}, c))
    return specs
