"""Fused multi-tensor element-wise optimizer steps in Triton: the ``fastopt::adam_step_``,
``fastopt::lion_step_``, ``fastopt::mars_step_``, ``fastopt::sophia_step_`` and ``fastopt::adam_mini_step_``
contracts (schemas in csrc/fastopt.cpp, math in fastopt/reference).

One launch covers all n tensors of a bucket. Program ``pid`` reads ``(tensor index, chunk index)``
from a chunk table, then that tensor's addresses from a pointer table (one int64 row per tensor),
and updates one chunk of ``CHUNK`` elements, viewed as a ``(CHUNK // BLOCK_Q, BLOCK_Q)`` tile so
that each fp8 scale block is one tile row.

The kernel is an *engine* (traversal, loads/stores of every storage format, weight decay, the cautious
mask) plus an *update math* function chosen by the ``MATH`` constexpr that advances the moments and
returns the update u; another element-wise optimizer adds a math function and a branch in ``_update``,
not a new engine. Per element in fp32 (t = step, already incremented):
    g = grad / grad_scale, negated if maximize
    AdamW / NAdamW: m += (1-b1) (g - m);  v = b2 v + (1-b2) g^2;  vv = max(vmax, v) if amsgrad else v
                    denom = sqrt(vv) / sqrt(1-b2^t) + eps
                    AdamW:  u = lr/(1-b1^t) * m / denom
                    NAdamW: u = lr * (b1 m/(1-b1^(t+1)) + (1-b1) g/(1-b1^t)) / denom
    Lion:           u = lr * sign(b1 m + (1-b1) g);  m = b2 m + (1-b2) g
    MARS-AdamW:     c = g + k (g - g_prev),  k = gamma b1/(1-b1),  g_prev = last_grads (the previous g)
                    c = c / |c| if |c| > 1,  |c| = sqrt(sum of c^2 over the tensor);  last_grads = g
                    then AdamW (u, m, v, vmax as above) on c instead of g
    Sophia (G):     m = b1 m + (1-b1) g;  u = lr * sign(m) * min(|m| / (max(rho bs h, 0) + 1e-15), 1)
                    h = hessians (the Hessian EMA): read only, written by the optimizer's Hessian update;
                    rho bs comes from the host (fp64 product, one fp32 argument); no cautious, no amsgrad
    Adam-mini:      m = b1 m + (1-b1) g;  u = m * s[i // L]   (the element-wise half of Adam-mini)
                    tensor t is cut into contiguous segments of L = segment_lengths[t] elements (any divisor of
                    numel; a pointer-table column), i is the element's 64-bit flat index, s = step_sizes[t]: one
                    fp32 step size per segment, read only, computed by fastopt.AdamMini from its per-segment
                    second moments; no cautious, no amsgrad
    p = p * (1 - lr*wd) - u * w,  w = 1, or for cautious: [u g > 0] / max(mean over the tensor, 1e-3)  (raw g)
The per-tensor reductions take extra launches before the update, chosen by the PASS constexpr, so that no
host synchronisation is needed: SQUARES (MARS) adds each tensor's sum of the unclipped c^2 into an fp32 sum,
COUNT (cautious) adds each tensor's number of u g > 0 into an int64 counter (exact), both with atomics; the
later passes read them (c is clipped in COUNT too). Nothing else is written in the SQUARES and COUNT passes.
Storage: fp32 / bf16 (round to nearest even) / fp8 e4m3fn codes with one fp32 absmax scale per
block_size elements; in fp8 the second moments (v, vmax) are stored as their square roots, the signed states
(m, last_grads, Sophia's h) as they are; Adam-mini's step sizes are always plain fp32. All conversions use
integer and IEEE float ops only (no native fp8 or bf16 casts), so sm_80, sm_90 and the interpreter agree.

The same loads and stores serve a second, smaller kernel: the momentum pass of the orthogonalized optimizers
(Muon, Scion, ROOT) before Newton-Schulz, ``momentum_direction`` (the list form of the CPU op
``fastopt::momentum_direction_``): B ← β·B + γ·g, M = δ·g + ε·B and Σ M² per tensor, one launch per bucket.
"""
import math
from collections import OrderedDict

import torch
import triton
import triton.language as tl

CHUNK = 2048          # elements per program; fp8 uses max(CHUNK, block_size) ...
NUM_WARPS = 8         # ... with NUM_WARPS * chunk // CHUNK warps
MAX_REGISTERS = 128   # per thread: left to itself, ptxas caps some Lion variants at 64 and spills
FP8_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)   # as fastopt.state.check_block_size

# Storage format codes (constexpr values).
F32, BF16, F16, FP8 = 0, 1, 2, 3
_FMT = {torch.float32: F32, torch.bfloat16: BF16, torch.float16: F16, torch.float8_e4m3fn: FP8}
ADAM, LION, MARS, SOPHIA, ADAM_MINI = 0, 1, 2, 3, 4     # MATH: update rules (see _update)
_ADAM, _LION, _MARS, _SOPHIA = tl.constexpr(ADAM), tl.constexpr(LION), tl.constexpr(MARS), tl.constexpr(SOPHIA)
_ADAM_MINI = tl.constexpr(ADAM_MINI)
UPDATE, COUNT, SQUARES = 0, 1, 2    # PASS: launches of a step (see _launch)
_UPDATE, _COUNT, _SQUARES = tl.constexpr(UPDATE), tl.constexpr(COUNT), tl.constexpr(SQUARES)

# Pointer-table columns (one row of int64 per tensor): the data_ptr of each list's tensor (0 when unused), then
# numel and the segment length. HESS: Sophia's Hessian EMA h (read only); STEP_SIZES: Adam-mini's per-segment
# step sizes (fp32, read only); SEG_LEN: Adam-mini's segment length L (0 for the other rules).
P, G, M, V, VMAX, LAST, M_SC, V_SC, VMAX_SC, LAST_SC, MASTER_P, STEP, HESS, HESS_SC, STEP_SIZES = range(15)
NUMEL, SEG_LEN = 15, 16
NSLOTS = 17
SCALE_SLOTS = (M_SC, V_SC, VMAX_SC, LAST_SC, HESS_SC)   # fp8 scales: one fp32 per block, not 16-byte aligned
UNALIGNED_SLOTS = SCALE_SLOTS + (STEP, STEP_SIZES)       # not element-wise: left out of the alignment check
_P, _G, _M, _V, _VMAX = tl.constexpr(P), tl.constexpr(G), tl.constexpr(M), tl.constexpr(V), tl.constexpr(VMAX)
_LAST, _M_SC, _V_SC = tl.constexpr(LAST), tl.constexpr(M_SC), tl.constexpr(V_SC)
_VMAX_SC, _LAST_SC = tl.constexpr(VMAX_SC), tl.constexpr(LAST_SC)
_HESS, _HESS_SC = tl.constexpr(HESS), tl.constexpr(HESS_SC)
_STEP_SIZES, _SEG_LEN = tl.constexpr(STEP_SIZES), tl.constexpr(SEG_LEN)
_MASTER, _STEP, _NUMEL, _NSLOTS = tl.constexpr(MASTER_P), tl.constexpr(STEP), tl.constexpr(NUMEL), tl.constexpr(NSLOTS)
_F32, _BF16, _F16, _FP8 = tl.constexpr(F32), tl.constexpr(BF16), tl.constexpr(F16), tl.constexpr(FP8)


# ----------------------------------------------------------------------------- bit-exact numerics
@triton.jit
def _hash32(x):
    """lowbias32 on uint32, wrapping multiplies."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _bf16_rne(x):
    """fp32 -> bf16 bits, round to nearest even (NaN stays NaN)."""
    u = x.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, r).to(tl.uint16)


@triton.jit
def _bf16_stochastic(x, key, idx):
    """fp32 -> bf16 bits: add 16 hashed bits of (element index ^ tensor key) below bf16, truncate."""
    r = _hash32(idx ^ key)
    return ((x.to(tl.uint32, bitcast=True) + (r & 0xFFFF)) >> 16).to(tl.uint16)


@triton.jit
def _e4m3_decode(code):
    """e4m3fn byte -> fp32 (0x7F / 0xFF -> NaN)."""
    c = code.to(tl.uint32)
    e = (c >> 3) & 15
    f = c & 7
    normal = (((e + 120) << 23) | (f << 20)).to(tl.float32, bitcast=True)
    mag = tl.where(e == 0, f.to(tl.float32) * 0.001953125, normal)
    mag = tl.where((c & 0x7F) == 0x7F, float("nan"), mag)
    return tl.where((c & 0x80) != 0, -mag, mag)


@triton.jit
def _e4m3_encode(y):
    """fp32 -> e4m3fn byte: round to nearest even, saturate at 448, NaN -> 0x7F | sign."""
    sign = (y.to(tl.uint32, bitcast=True) >> 24) & 0x80
    a = tl.minimum(tl.abs(y), 448.0)
    # below 2^-6: subnormal grid of 2^-9; rint(a * 512) with ties to even, by integer ops
    s = a * 512.0
    fl = s.to(tl.uint32)
    fr = s - fl.to(tl.float32)
    sub = fl + ((fr > 0.5) | ((fr == 0.5) & ((fl & 1) == 1))).to(tl.uint32)
    bits = a.to(tl.uint32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - (120 << 3)
    mag = tl.where(a < 0.015625, sub, normal)
    mag = tl.where(y != y, 0x7F, mag)
    return (sign | mag).to(tl.uint8)


# ----------------------------------------------------------------------------- engine: loads / stores
@triton.jit
def _ptr(addr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """int64 address -> typed pointer; ALIGNED: 16-byte aligned (enables vector accesses)."""
    p = addr.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _load(addr, start, loc, mask, FMT: tl.constexpr, ALIGNED: tl.constexpr):
    """Load a tile of a plain tensor (F32 / BF16 / F16) as fp32."""
    if FMT == _F32:
        x = tl.load(_ptr(addr, tl.float32, ALIGNED) + start + loc, mask=mask, other=0.0)
    elif FMT == _F16:
        x = tl.load(_ptr(addr, tl.float16, ALIGNED) + start + loc, mask=mask, other=0.0).to(tl.float32)
    else:
        u = tl.load(_ptr(addr, tl.uint16, ALIGNED) + start + loc, mask=mask, other=0)
        x = (u.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x


@triton.jit
def _store(addr, start, loc, x, mask, FMT: tl.constexpr, ALIGNED: tl.constexpr, SR: tl.constexpr, key):
    """Store an fp32 tile as F32 / F16 / BF16 (RNE, or stochastic rounding when SR)."""
    if FMT == _F32:
        tl.store(_ptr(addr, tl.float32, ALIGNED) + start + loc, x, mask=mask)
    elif FMT == _F16:
        tl.store(_ptr(addr, tl.float16, ALIGNED) + start + loc, x.to(tl.float16), mask=mask)
    else:
        if SR:
            bits = _bf16_stochastic(x, key, start.to(tl.uint32) + loc.to(tl.uint32))
        else:
            bits = _bf16_rne(x)
        tl.store(_ptr(addr, tl.uint16, ALIGNED) + start + loc, bits, mask=mask)


@triton.jit
def _load_state(row, SLOT: tl.constexpr, SC_SLOT: tl.constexpr, start, loc, rows, mask, rmask,
                FMT: tl.constexpr, SQUARED: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Load a moment as fp32; fp8: decode(code) * scale[block], squared for second moments."""
    addr = tl.load(row + SLOT)
    if FMT == _FP8:
        code = tl.load(_ptr(addr, tl.uint8, ALIGNED) + start + loc, mask=mask, other=0)
        sc_ptr = tl.load(row + SC_SLOT).to(tl.pointer_type(tl.float32)) + start // BLOCK_Q
        scale = tl.load(sc_ptr + rows, mask=rmask, other=0.0)
        x = _e4m3_decode(code) * scale[:, None]
        if SQUARED:
            x = x * x
    else:
        x = _load(addr, start, loc, mask, FMT, ALIGNED)
    return x


@triton.jit
def _store_state(row, SLOT: tl.constexpr, SC_SLOT: tl.constexpr, start, loc, rows, x, mask, rmask,
                 FMT: tl.constexpr, SQUARED: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Store a moment; fp8: per tile row (= scale block) absmax, scale = absmax/448, codes of x*448/absmax."""
    addr = tl.load(row + SLOT)
    if FMT == _FP8:
        if SQUARED:
            x = tl.sqrt_rn(x)
        x = tl.where(mask, x, 0.0)                      # a partial last block: absmax of valid elements
        # absmax on the bits of |x|: integer order is float order for x >= 0, and NaN wins (as torch.amax).
        # tl.reduce with the standard max combine, not tl.max: tl.max is a @jit function decorated when triton
        # is imported, so it breaks a kernel interpreted in a process that imported triton in compiled mode.
        bits = x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
        absmax = tl.reduce(bits, 1, tl.standard._elementwise_max).to(tl.float32, bitcast=True)
        inv = tl.where(absmax > 0, tl.math.div_rn(448.0, tl.where(absmax > 0, absmax, 1.0)), 0.0)
        code = _e4m3_encode(x * inv[:, None])
        tl.store(_ptr(addr, tl.uint8, ALIGNED) + start + loc, code, mask=mask)
        sc_ptr = tl.load(row + SC_SLOT).to(tl.pointer_type(tl.float32)) + start // BLOCK_Q
        tl.store(sc_ptr + rows, tl.math.div_rn(absmax, 448.0), mask=rmask)
    else:
        _store(addr, start, loc, x, mask, FMT, ALIGNED, False, 0)


@triton.jit
def _tile_sum(x):
    """Sum of a 2-D tile (tl.reduce with the standard combine, not tl.sum: see _store_state)."""
    return tl.reduce(tl.reduce(x, 1, tl.standard._sum_combine), 0, tl.standard._sum_combine)


# ----------------------------------------------------------------------------- update math
@triton.jit
def _one_minus_pow(log_beta, t):
    """1 - beta^t = -expm1(t * ln beta), accurate near t = 1 (ln beta comes from the host in fp64)."""
    y = t * log_beta                      # <= 0; -inf for beta = 0
    z = tl.maximum(y, -0.5)               # Taylor series of expm1 on [-0.5, 0]: error < 1e-9 relative
    s = 1.0 + z * (1.0 / 9.0)
    s = 1.0 + z * (1.0 / 8.0) * s
    s = 1.0 + z * (1.0 / 7.0) * s
    s = 1.0 + z * (1.0 / 6.0) * s
    s = 1.0 + z * (1.0 / 5.0) * s
    s = 1.0 + z * (1.0 / 4.0) * s
    s = 1.0 + z * (1.0 / 3.0) * s
    s = 1.0 + z * 0.5 * s
    return tl.where(y > -0.5, -z * s, 1.0 - tl.exp(y))


@triton.jit
def _adam_math(g, m, v, vmax, t, lr, beta1, beta2, eps, log_beta1, log_beta2, MODE: tl.constexpr,
               AMSGRAD: tl.constexpr):
    """AdamW (MODE 0) / NAdamW (MODE 1) on fp32 tiles; returns (u, m, v, vmax)."""
    bc1 = _one_minus_pow(log_beta1, t)
    sqrt_bc2 = tl.sqrt_rn(_one_minus_pow(log_beta2, t))
    m = m + (1.0 - beta1) * (g - m)
    v = beta2 * v + (1.0 - beta2) * g * g
    if AMSGRAD:
        vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
        denom = tl.math.div_rn(tl.sqrt_rn(vmax), sqrt_bc2) + eps
    else:
        denom = tl.math.div_rn(tl.sqrt_rn(v), sqrt_bc2) + eps
    if MODE == 0:
        u = tl.math.div_rn(tl.math.div_rn(lr, bc1) * m, denom)
    else:
        c_m = tl.math.div_rn(beta1, _one_minus_pow(log_beta1, t + 1.0))
        c_g = tl.math.div_rn(1.0 - beta1, bc1)
        u = tl.math.div_rn(lr * (c_m * m + c_g * g), denom)
    return u, m, v, vmax


@triton.jit
def _lion_math(g, m, lr, beta1, beta2):
    """Lion on fp32 tiles; returns (u, m). sign(0) = 0 and sign(NaN) = NaN, as torch.sign."""
    c = beta1 * m + (1.0 - beta1) * g
    u = tl.where(c > 0, lr, tl.where(c < 0, -lr, c * lr))
    return u, beta2 * m + (1.0 - beta2) * g


@triton.jit
def _sophia_math(g, m, h, lr, beta1, rho_bs):
    """SophiaG on fp32 tiles; returns (u, m). h is read only. sign(0) = 0; a NaN in m or h gives a NaN u (the
    clamps propagate NaN, as torch.clamp); a negative h clamps to 0, giving the full step lr sign(m)."""
    m = beta1 * m + (1.0 - beta1) * g
    denom = tl.maximum(rho_bs * h, 0.0, propagate_nan=tl.PropagateNan.ALL) + 1e-15
    ratio = tl.minimum(tl.math.div_rn(tl.abs(m), denom), 1.0, propagate_nan=tl.PropagateNan.ALL)
    u = tl.where(m > 0, lr, tl.where(m < 0, -lr, m * lr)) * ratio
    return u, m


@triton.jit
def _adam_mini_math(g, m, s, beta1):
    """Adam-mini's element-wise half on fp32 tiles; returns (u, m). s: each element's segment step size."""
    m = beta1 * m + (1.0 - beta1) * g
    return m * s, m


@triton.jit
def _update(MATH: tl.constexpr, g, m, v, vmax, aux, t, lr, beta1, beta2, eps, log_beta1, log_beta2, rule_coef,
            MODE: tl.constexpr, AMSGRAD: tl.constexpr):
    """Selects the update math on the gradient g the rule sees (MARS: its clipped c): returns (u, m, v, vmax).
    aux is the rule's read-only tile (Sophia: h; Adam-mini: each element's step size); rule_coef the rule's own
    scalar (MARS: k, already applied to c; Sophia: rho * bs). Add optimizers here."""
    if MATH == _LION:
        u, m = _lion_math(g, m, lr, beta1, beta2)
    elif MATH == _SOPHIA:
        u, m = _sophia_math(g, m, aux, lr, beta1, rule_coef)
    elif MATH == _ADAM_MINI:
        u, m = _adam_mini_math(g, m, aux, beta1)
    else:  # MARS-AdamW is AdamW (MODE 0) on c
        tl.static_assert((MATH == _ADAM) or (MATH == _MARS), "unknown MATH")
        u, m, v, vmax = _adam_math(g, m, v, vmax, t, lr, beta1, beta2, eps, log_beta1, log_beta2, MODE, AMSGRAD)
    return u, m, v, vmax


# ----------------------------------------------------------------------------- engine: one chunk, kernel
@triton.jit
def _segment_index(start, loc, seg_len, CHUNK: tl.constexpr):
    """Segment index (start + loc) // seg_len, exactly, for a chunk's 64-bit element offset start and a tile
    0 <= loc < CHUNK: returned as the int64 index q0 of the chunk's first segment and an int32 tile q, the index
    being q0 + q. One 64-bit division per program; per element an int32 one.
    With q0, r0 = divmod(start, seg_len) the index is q0 + (r0 + loc) // seg_len, where only the distance to the
    next boundary, d = seg_len - r0, matters, and only up to CHUNK: with Lc = min(seg_len, CHUNK) and
    r = Lc - min(d, CHUNK), (r + loc) // Lc is the same quotient (seg_len < CHUNK: r = r0 and Lc = seg_len;
    otherwise it is [loc >= d], 0 or 1), and every term fits in int32."""
    q0 = start // seg_len
    d = seg_len - (start - q0 * seg_len)
    lc = tl.minimum(seg_len, CHUNK).to(tl.int32)
    x = lc - tl.minimum(d, CHUNK).to(tl.int32) + loc
    return q0, x // lc


@triton.jit
def _step_chunk(row, tid, start, n_valid, counts_ptr, sums_ptr, lr, gscale, beta1, beta2, eps, weight_decay,
                log_beta1, log_beta2, rule_coef, sr_seed, MATH: tl.constexpr, MODE: tl.constexpr,
                PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, AMSGRAD: tl.constexpr, MASTER: tl.constexpr,
                MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, CAUTIOUS: tl.constexpr, PASS: tl.constexpr,
                SR: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Update elements [start, start + n_valid) of tensor `tid` (n_valid is the constexpr CHUNK for full chunks);
    PASS SQUARES: only add the chunk's sum of c^2 to sums_ptr[tid]; COUNT: only add its number of u g > 0 to
    counts_ptr[tid]."""
    rows = tl.arange(0, CHUNK // BLOCK_Q)
    loc = rows[:, None] * BLOCK_Q + tl.arange(0, BLOCK_Q)[None, :]
    mask = loc < n_valid
    rmask = rows * BLOCK_Q < n_valid

    g = _load(tl.load(row + _G), start, loc, mask, PARAM_DTYPE, ALIGNED)
    if HAS_GRAD_SCALE:
        g = tl.math.div_rn(g, gscale)
    if MAXIMIZE:
        g = -g
    c = g                                                     # the gradient the update math sees
    if MATH == _MARS:
        g_prev = _load_state(row, _LAST, _LAST_SC, start, loc, rows, mask, rmask, STATE_DTYPE, False, ALIGNED,
                             BLOCK_Q)
        c = g + rule_coef * (g - g_prev)                     # rule_coef = k
        if PASS == _SQUARES:
            tl.atomic_add(sums_ptr + tid, _tile_sum(tl.where(mask, c * c, 0.0)))
            return
        norm = tl.sqrt_rn(tl.load(sums_ptr + tid))
        c = tl.where(norm > 1.0, c * tl.math.div_rn(1.0, norm), c)     # a NaN norm leaves c as it is
    m = _load_state(row, _M, _M_SC, start, loc, rows, mask, rmask, STATE_DTYPE, False, ALIGNED, BLOCK_Q)
    v = 0.0
    vmax = 0.0
    aux = 0.0                                                 # the rule's read-only tile
    t = 0.0
    if MATH == _SOPHIA:
        aux = _load_state(row, _HESS, _HESS_SC, start, loc, rows, mask, rmask, STATE_DTYPE, False, ALIGNED, BLOCK_Q)
    if MATH == _ADAM_MINI:
        q0, rel = _segment_index(start, loc, tl.load(row + _SEG_LEN), CHUNK)
        aux = tl.load(tl.load(row + _STEP_SIZES).to(tl.pointer_type(tl.float32)) + q0 + rel, mask=mask, other=0.0)
    if (MATH == _ADAM) or (MATH == _MARS):
        v = _load_state(row, _V, _V_SC, start, loc, rows, mask, rmask, STATE_DTYPE, True, ALIGNED, BLOCK_Q)
        if AMSGRAD:
            vmax = _load_state(row, _VMAX, _VMAX_SC, start, loc, rows, mask, rmask, STATE_DTYPE, True, ALIGNED,
                               BLOCK_Q)
        t = tl.load(tl.load(row + _STEP).to(tl.pointer_type(tl.float32)))

    u, m, v, vmax = _update(MATH, c, m, v, vmax, aux, t, lr, beta1, beta2, eps, log_beta1, log_beta2, rule_coef, MODE,
                            AMSGRAD)
    agrees = (u * g > 0) & mask
    if PASS == _COUNT:
        tl.atomic_add(counts_ptr + tid, _tile_sum(agrees.to(tl.int64)))
        return
    if CAUTIOUS:
        mean = tl.math.div_rn(tl.load(counts_ptr + tid).to(tl.float32), tl.load(row + _NUMEL).to(tl.float32))
        u = tl.where(agrees, u * tl.math.div_rn(1.0, tl.maximum(mean, 1e-3)), 0.0)
    p_addr = tl.load(row + _P)
    if MASTER:
        master_addr = tl.load(row + _MASTER)
        p = _load(master_addr, start, loc, mask, _F32, ALIGNED)
    else:
        p = _load(p_addr, start, loc, mask, PARAM_DTYPE, ALIGNED)
    p = p * (1.0 - lr * weight_decay) - u

    _store_state(row, _M, _M_SC, start, loc, rows, m, mask, rmask, STATE_DTYPE, False, ALIGNED, BLOCK_Q)
    if (MATH == _ADAM) or (MATH == _MARS):
        _store_state(row, _V, _V_SC, start, loc, rows, v, mask, rmask, STATE_DTYPE, True, ALIGNED, BLOCK_Q)
    if AMSGRAD:
        _store_state(row, _VMAX, _VMAX_SC, start, loc, rows, vmax, mask, rmask, STATE_DTYPE, True, ALIGNED, BLOCK_Q)
    if MATH == _MARS:
        _store_state(row, _LAST, _LAST_SC, start, loc, rows, g, mask, rmask, STATE_DTYPE, False, ALIGNED, BLOCK_Q)
    if MASTER:
        _store(master_addr, start, loc, p, mask, _F32, ALIGNED, False, 0)
    key = 0
    if SR:
        key = _hash32(sr_seed.to(tl.uint32, bitcast=True) + 0x9E3779B9 * (tid + 1).to(tl.uint32))
    _store(p_addr, start, loc, p, mask, PARAM_DTYPE, ALIGNED, SR, key)


@triton.jit(do_not_specialize=["sr_seed"])
def elementwise_step_kernel(ptr_table, chunk_table, counts_ptr, sums_ptr, lr_ptr, grad_scale_ptr, found_inf_ptr,
                            lr, beta1, beta2, eps, weight_decay, log_beta1, log_beta2, rule_coef, sr_seed,
                            MATH: tl.constexpr, MODE: tl.constexpr, PARAM_DTYPE: tl.constexpr,
                            STATE_DTYPE: tl.constexpr, AMSGRAD: tl.constexpr, MASTER: tl.constexpr,
                            MAXIMIZE: tl.constexpr, HAS_LR_TENSOR: tl.constexpr,  # MODE 1: NAdamW
                            HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, CAUTIOUS: tl.constexpr,
                            PASS: tl.constexpr, SR: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
                            BLOCK_Q: tl.constexpr):
    """Program pid updates chunk chunk_table[pid] = (tensor index, chunk index) of the tensor in ptr_table row.
    rule_coef: the rule's own scalar, k = gamma b1/(1-b1) for MARS, rho * bs for Sophia (unused otherwise); the
    segment length of Adam-mini comes per tensor from the pointer table."""
    pid = tl.program_id(0)
    tid = tl.load(chunk_table + 2 * pid)
    start = tl.load(chunk_table + 2 * pid + 1).to(tl.int64) * CHUNK        # 64-bit element offset
    row = ptr_table + tid * _NSLOTS
    if HAS_FOUND_INF:
        skip = tl.load(found_inf_ptr) != 0.0
    else:
        skip = False
    if HAS_LR_TENSOR:
        lr = tl.load(lr_ptr)
    gscale = 1.0
    if HAS_GRAD_SCALE:
        gscale = tl.load(grad_scale_ptr)
    if not skip:
        remaining = tl.load(row + _NUMEL) - start
        if remaining >= CHUNK:   # full chunk: compile-time mask, vectorised accesses
            _step_chunk(row, tid, start, CHUNK, counts_ptr, sums_ptr, lr, gscale, beta1, beta2, eps, weight_decay,
                        log_beta1, log_beta2, rule_coef, sr_seed, MATH, MODE, PARAM_DTYPE, STATE_DTYPE, AMSGRAD, MASTER,
                        MAXIMIZE, HAS_GRAD_SCALE, CAUTIOUS, PASS, SR, ALIGNED, CHUNK, BLOCK_Q)
        else:
            _step_chunk(row, tid, start, remaining.to(tl.int32), counts_ptr, sums_ptr, lr, gscale, beta1, beta2, eps,
                        weight_decay, log_beta1, log_beta2, rule_coef, sr_seed, MATH, MODE, PARAM_DTYPE, STATE_DTYPE,
                        AMSGRAD, MASTER, MAXIMIZE, HAS_GRAD_SCALE, CAUTIOUS, PASS, SR, ALIGNED, CHUNK, BLOCK_Q)


# ----------------------------------------------------------------------------- momentum pass
@triton.jit
def _momentum_chunk(row, start, n_valid, partial_ptr, beta, gamma, delta, epsilon, GRAD_DTYPE: tl.constexpr,
                    BUF_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
                    BLOCK_Q: tl.constexpr):
    """B ← β·B + γ·g and M = δ·g + ε·B (the new B) on elements [start, start + n_valid) of one tensor; the chunk's
    Σ M² (in float64: it cannot overflow) to partial_ptr."""
    rows = tl.arange(0, CHUNK // BLOCK_Q)
    loc = rows[:, None] * BLOCK_Q + tl.arange(0, BLOCK_Q)[None, :]
    mask = loc < n_valid
    rmask = rows * BLOCK_Q < n_valid
    g = _load(tl.load(row + _G), start, loc, mask, GRAD_DTYPE, ALIGNED)
    b = _load_state(row, _M, _M_SC, start, loc, rows, mask, rmask, BUF_DTYPE, False, ALIGNED, BLOCK_Q)
    b = beta * b + gamma * g
    m = delta * g + epsilon * b
    _store_state(row, _M, _M_SC, start, loc, rows, b, mask, rmask, BUF_DTYPE, False, ALIGNED, BLOCK_Q)
    _store(tl.load(row + _P), start, loc, m, mask, OUT_DTYPE, ALIGNED, False, 0)
    m = tl.where(mask, m, 0.0).to(tl.float64)
    tl.store(partial_ptr, _tile_sum(m * m))


@triton.jit
def momentum_direction_kernel(ptr_table, chunk_table, partials, max_chunks, beta, gamma, delta, epsilon,
                              GRAD_DTYPE: tl.constexpr, BUF_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr,
                              ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK_Q: tl.constexpr):
    """The momentum pass of the orthogonalized optimizers: program pid updates chunk chunk_table[pid] = (tensor
    index, chunk index) of the tensor in ptr_table row (slots: G the gradient, M / M_SC the buffer and its fp8
    scales, P the direction M) and writes the chunk's Σ M² to partials[tensor, chunk]."""
    pid = tl.program_id(0)
    tid = tl.load(chunk_table + 2 * pid)
    cid = tl.load(chunk_table + 2 * pid + 1)
    start = cid.to(tl.int64) * CHUNK
    row = ptr_table + tid * _NSLOTS
    partial_ptr = partials + tid.to(tl.int64) * max_chunks + cid
    remaining = tl.load(row + _NUMEL) - start
    if remaining >= CHUNK:
        _momentum_chunk(row, start, CHUNK, partial_ptr, beta, gamma, delta, epsilon, GRAD_DTYPE, BUF_DTYPE,
                        OUT_DTYPE, ALIGNED, CHUNK, BLOCK_Q)
    else:
        _momentum_chunk(row, start, remaining.to(tl.int32), partial_ptr, beta, gamma, delta, epsilon, GRAD_DTYPE,
                        BUF_DTYPE, OUT_DTYPE, ALIGNED, CHUNK, BLOCK_Q)


# ----------------------------------------------------------------------------- host side
# Tables live on the device and are cached: chunk tables per (numels, chunk), pointer tables per set of
# data_ptrs. Per-tensor validation runs when a pointer table is built: a cache hit means the very storages
# (addresses, sizes, list layout) of a call that was validated, so a step costs one data_ptr() per tensor.
_CHUNK_TABLES: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_PTR_TABLES: "OrderedDict[tuple, tuple]" = OrderedDict()
_DUMMIES: "OrderedDict[torch.device, torch.Tensor]" = OrderedDict()
_CACHE_SIZE = 64


def _cached(cache, key, build):
    value = cache.get(key)
    if value is None:
        value = cache[key] = build()
        if len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return value


def _to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-built table on ``device`` without waiting for the GPU: pinned memory and an asynchronous copy (a table
    built mid-training, e.g. for Adam-mini's step sizes, which are new tensors every step, must not stall the step)."""
    return table.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else table.to(device)


def _build_chunk_table(numels, chunk, device):
    """int32 [n_chunks, 2]: (tensor index, chunk index within the tensor)."""
    counts = torch.tensor([-(-n // chunk) for n in numels], dtype=torch.int64)
    tids = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first = torch.cumsum(counts, 0) - counts
    cids = torch.arange(int(counts.sum())) - torch.repeat_interleave(first, counts)
    return _to_device(torch.stack([tids, cids], 1).to(torch.int32).contiguous(), device)


def _build_ptr_table(n, lists, numels, device, segment_lengths=None):
    """int64 [n, NSLOTS]: data_ptr of every tensor of each slot (0 when unused), numel and the segment length
    (Adam-mini; 0 otherwise); and whether every element tensor (not the scales, steps or step sizes) is 16-byte
    aligned."""
    rows = [[0] * NSLOTS for _ in range(n)]
    aligned = True
    for slot, lst in enumerate(lists):
        for i, t in enumerate(lst):
            rows[i][slot] = t.data_ptr()
            aligned &= slot in UNALIGNED_SLOTS or rows[i][slot] % 16 == 0
    for i, ne in enumerate(numels):
        rows[i][NUMEL] = ne
    for i, seg_len in enumerate(segment_lengths or ()):
        rows[i][SEG_LEN] = seg_len
    return _to_device(torch.tensor(rows, dtype=torch.int64), device), aligned


def _check_list(op, name, lst, n, device, dtype, shapes=None, numels=None):
    if len(lst) != n:
        raise ValueError(f"{op}: {name} has {len(lst)} tensors, expected {n}")
    for i, t in enumerate(lst):
        if t.device != device:
            raise ValueError(f"{op}: {name}[{i}] is on {t.device}, params on {device}")
        if t.dtype != dtype:
            raise TypeError(f"{op}: {name}[{i}] has dtype {t.dtype}, expected {dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name}[{i}] is not contiguous")
        if shapes is not None and t.shape != shapes[i]:
            raise ValueError(f"{op}: {name}[{i}] has shape {tuple(t.shape)}, expected {tuple(shapes[i])}")
        if numels is not None and t.numel() != numels[i]:
            raise ValueError(f"{op}: {name}[{i}] has {t.numel()} elements, expected {numels[i]}")


def _check_scalar(op, name, t, device):
    if t is not None and (t.device != device or t.dtype != torch.float32 or t.numel() != 1):
        raise ValueError(f"{op}: {name} must be a one-element float32 tensor on {device}, "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device}")


# The lists of the pointer table's element slots, by name, and the moments of each rule: (slot of the moment,
# slot of its fp8 scales, whether the rule may leave it empty).
_SLOT_NAMES = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "last_grads", "exp_avg_scales",
               "exp_avg_sq_scales", "max_exp_avg_sq_scales", "last_grad_scales", "master_params", "state_steps",
               "hessians", "hessian_scales", "step_sizes")
_ADAM_MOMENTS = ((M, M_SC, False), (V, V_SC, False), (VMAX, VMAX_SC, True))
_MOMENTS = {ADAM: _ADAM_MOMENTS, LION: ((M, M_SC, False),), MARS: _ADAM_MOMENTS + ((LAST, LAST_SC, False),),
            SOPHIA: ((M, M_SC, False), (HESS, HESS_SC, False)), ADAM_MINI: ((M, M_SC, False),)}


def _validate(op, math_id, lists, device, pdtype, sdtype, block_size, segment_lengths=None):
    n, shapes = len(lists[P]), [p.shape for p in lists[P]]
    _check_list(op, "params", lists[P], n, device, pdtype)
    _check_list(op, "grads", lists[G], n, device, pdtype, shapes)
    nblocks = [-(-p.numel() // block_size) for p in lists[P]]
    fp8 = sdtype == torch.float8_e4m3fn
    for slot, sc_slot, optional in _MOMENTS[math_id]:
        count = n if lists[slot] or not optional else 0
        _check_list(op, _SLOT_NAMES[slot], lists[slot], count, device, sdtype, shapes)
        if fp8:
            _check_list(op, _SLOT_NAMES[sc_slot], lists[sc_slot], count, device, torch.float32, numels=nblocks)
        elif lists[sc_slot]:
            raise ValueError(f"{op}: {_SLOT_NAMES[sc_slot]} must be empty unless the state dtype is float8_e4m3fn")
    _check_list(op, "master_params", lists[MASTER_P], n if lists[MASTER_P] else 0, device, torch.float32, shapes)
    if math_id in (ADAM, MARS):
        _check_list(op, "state_steps", lists[STEP], n, device, torch.float32, numels=[1] * n)
    if math_id == ADAM_MINI:
        segment_lengths = () if segment_lengths is None else segment_lengths
        if len(segment_lengths) != n:
            raise ValueError(f"{op}: segment_lengths has {len(segment_lengths)} entries, expected {n}")
        numels = [p.numel() for p in lists[P]]
        for i, (seg_len, numel) in enumerate(zip(segment_lengths, numels)):
            if not isinstance(seg_len, int) or isinstance(seg_len, bool) or seg_len <= 0 or numel % seg_len:
                raise ValueError(f"{op}: segment_lengths[{i}] is {seg_len!r}, expected a positive int dividing "
                                 f"the tensor's {numel} elements")
        _check_list(op, "step_sizes", lists[STEP_SIZES], n, device, torch.float32,
                    numels=[numel // seg_len for numel, seg_len in zip(numels, segment_lengths)])
    if device.type != "cuda" and isinstance(elementwise_step_kernel, triton.runtime.JITFunction):
        raise ValueError(f"{op} (triton): tensors are on {device}; the compiled kernel needs CUDA tensors "
                         "(CPU tensors run only under TRITON_INTERPRET=1)")


def _launch(op, math_id, lists, lr_tensor, lr, beta1, beta2, eps, weight_decay, mode, rule_coef, maximize, cautious,
            block_size, sr_seed, grad_scale, found_inf, segment_lengths=None) -> None:
    """Launches over the bucket: the SQUARES pass (MARS), the COUNT pass (cautious), then the UPDATE pass.
    lists: one list per slot, in slot order (_SLOT_NAMES); rule_coef: the rule's own scalar (see the kernel);
    segment_lengths: Adam-mini's one int per tensor (a table column, part of the table's cache key)."""
    params = lists[P]
    n = len(params)
    if n == 0:
        return
    device, pdtype = params[0].device, params[0].dtype
    if pdtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{op}: params must be float32, bfloat16 or float16, got {pdtype}")
    sdtype = lists[M][0].dtype if lists[M] else None
    if sdtype not in (torch.float32, torch.bfloat16, torch.float8_e4m3fn):
        raise TypeError(f"{op}: state must be float32, bfloat16 or float8_e4m3fn, got {sdtype}")
    fp8 = sdtype == torch.float8_e4m3fn
    if fp8 and block_size not in FP8_BLOCK_SIZES:
        raise ValueError(f"{op} (triton): fp8 block_size must be one of {FP8_BLOCK_SIZES}, got {block_size}")
    for name, t in (("lr_tensor", lr_tensor), ("grad_scale", grad_scale), ("found_inf", found_inf)):
        _check_scalar(op, name, t, device)

    numels = tuple(p.numel() for p in params)
    seg_lens = tuple(segment_lengths) if segment_lengths is not None else None
    key = (math_id, device, pdtype, sdtype, block_size if fp8 else 0, tuple(map(len, lists)), numels, seg_lens,
           tuple(t.data_ptr() for lst in lists for t in lst))
    ptr_table, aligned = _cached(_PTR_TABLES, key, lambda: _validate(op, math_id, lists, device, pdtype, sdtype,
                                                                     block_size, seg_lens)
                                 or _build_ptr_table(n, lists, numels, device, seg_lens))
    chunk = max(CHUNK, block_size) if fp8 else CHUNK
    chunk_table = _cached(_CHUNK_TABLES, (device, numels, chunk), lambda: _build_chunk_table(numels, chunk, device))
    if chunk_table.shape[0] == 0:
        return

    dummy = _cached(_DUMMIES, device, lambda: torch.zeros(1, device=device))  # absent optional pointers
    mars = math_id == MARS
    counts = torch.zeros(n, dtype=torch.int64, device=device) if cautious else dummy
    sums = torch.zeros(n, dtype=torch.float32, device=device) if mars else dummy
    log = lambda b: math.log(b) if b > 0 else -math.inf  # noqa: E731
    seed = sr_seed & 0xFFFFFFFF                             # uint32(sr_seed), passed as an i32 bit pattern
    for pass_id in [SQUARES] * mars + [COUNT] * bool(cautious) + [UPDATE]:
        elementwise_step_kernel[(chunk_table.shape[0],)](
            ptr_table, chunk_table, counts, sums, dummy if lr_tensor is None else lr_tensor,
            dummy if grad_scale is None else grad_scale, dummy if found_inf is None else found_inf,
            float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), log(beta1), log(beta2),
            float(rule_coef), seed - (1 << 32) if seed >= 1 << 31 else seed,
            MATH=math_id, MODE=mode, PARAM_DTYPE=_FMT[pdtype], STATE_DTYPE=_FMT[sdtype],
            AMSGRAD=len(lists[VMAX]) > 0, MASTER=len(lists[MASTER_P]) > 0, MAXIMIZE=bool(maximize),
            HAS_LR_TENSOR=lr_tensor is not None, HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None, CAUTIOUS=bool(cautious), PASS=pass_id,
            SR=sr_seed >= 0 and pdtype == torch.bfloat16, ALIGNED=aligned, CHUNK=chunk,
            BLOCK_Q=block_size if fp8 else chunk, num_warps=NUM_WARPS * chunk // CHUNK, maxnreg=MAX_REGISTERS)


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales,
              max_exp_avg_sq_scales, master_params, state_steps, lr_tensor, lr, beta1, beta2, eps, weight_decay,
              nesterov, maximize, cautious, block_size, sr_seed, grad_scale, found_inf) -> None:
    """In-place fused AdamW (nesterov False) / NAdamW (nesterov True) step over a bucket of n tensors, in one
    kernel launch. Arguments and semantics are those of the ``fastopt::adam_step_`` op (csrc/fastopt.cpp,
    fastopt.reference.adam). Tensors must be CUDA tensors, or CPU tensors with a
    kernel built under ``TRITON_INTERPRET=1``.
    """
    if nesterov not in (0, 1):  # a bool; 0 / 1 (the spec's mode) are accepted too
        raise ValueError(f"adam_step: nesterov must be a bool (False: AdamW, True: NAdamW), got {nesterov!r}")
    lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, [], exp_avg_scales, exp_avg_sq_scales,
             max_exp_avg_sq_scales, [], master_params, state_steps, [], [], [])
    _launch("adam_step", ADAM, lists, lr_tensor, lr, beta1, beta2, eps, weight_decay, int(bool(nesterov)), 0.0,
            maximize, cautious, block_size, sr_seed, grad_scale, found_inf)


def lion_step(params, grads, exp_avgs, exp_avg_scales, master_params, lr_tensor, lr, beta1, beta2, weight_decay,
              maximize, cautious, block_size, sr_seed, grad_scale, found_inf) -> None:
    """In-place fused Lion step over a bucket of n tensors: the ``fastopt::lion_step_`` op (csrc/fastopt.cpp)."""
    lists = (params, grads, exp_avgs, [], [], [], exp_avg_scales, [], [], [], master_params, [], [], [], [])
    _launch("lion_step", LION, lists, lr_tensor, lr, beta1, beta2, 0.0, weight_decay, 0, 0.0, maximize, cautious,
            block_size, sr_seed, grad_scale, found_inf)


def mars_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, last_grads, exp_avg_scales, exp_avg_sq_scales,
              max_exp_avg_sq_scales, last_grad_scales, master_params, state_steps, lr_tensor, lr, beta1, beta2, eps,
              weight_decay, gamma, maximize, cautious, block_size, sr_seed, grad_scale, found_inf) -> None:
    """In-place fused MARS-AdamW step over a bucket of n tensors: the ``fastopt::mars_step_`` op (csrc/fastopt.cpp,
    math: fastopt.reference.mars). Two launches (three with cautious): per-tensor sums of squares, then the update.
    """
    lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, last_grads, exp_avg_scales, exp_avg_sq_scales,
             max_exp_avg_sq_scales, last_grad_scales, master_params, state_steps, [], [], [])
    mars_k = gamma * beta1 / (1 - beta1)  # in float64, as the reference
    _launch("mars_step", MARS, lists, lr_tensor, lr, beta1, beta2, eps, weight_decay, 0, mars_k, maximize, cautious,
            block_size, sr_seed, grad_scale, found_inf)


def sophia_step(params, grads, exp_avgs, hessians, exp_avg_scales, hessian_scales, master_params, lr_tensor, lr,
                beta1, rho, bs, weight_decay, maximize, block_size, sr_seed, grad_scale, found_inf) -> None:
    """In-place fused Sophia (SophiaG) step over a bucket of n tensors, in one kernel launch: the
    ``fastopt::sophia_step_`` op (csrc/fastopt.cpp, math: fastopt.reference.sophia). hessians (h, stored like
    exp_avgs: signed, not square-rooted) and hessian_scales are read, never written."""
    lists = (params, grads, exp_avgs, [], [], [], exp_avg_scales, [], [], [], master_params, [], hessians,
             hessian_scales, [])
    rho_bs = float(rho) * float(bs)  # in float64, as the reference; the kernel gets it rounded to fp32
    _launch("sophia_step", SOPHIA, lists, lr_tensor, lr, beta1, 0.0, 0.0, weight_decay, 0, rho_bs, maximize, False,
            block_size, sr_seed, grad_scale, found_inf)


def adam_mini_step(params, grads, exp_avgs, exp_avg_scales, step_sizes, segment_lengths, master_params, lr_tensor,
                   lr, beta1, weight_decay, maximize, block_size, sr_seed, grad_scale, found_inf) -> None:
    """In-place fused element-wise half of an Adam-mini step over a bucket of n tensors, in one kernel launch: the
    ``fastopt::adam_mini_step_`` op (csrc/fastopt.cpp, math: fastopt.reference.adam_mini). Tensor i is cut into
    segments of segment_lengths[i] elements (a positive int dividing its numel); step_sizes[i] (fp32, numel / L
    values) holds the step size of each segment and is read, never written."""
    lists = (params, grads, exp_avgs, [], [], [], exp_avg_scales, [], [], [], master_params, [], [], [], step_sizes)
    _launch("adam_mini_step", ADAM_MINI, lists, lr_tensor, lr, beta1, 0.0, 0.0, weight_decay, 0, 0.0, maximize,
            False, block_size, sr_seed, grad_scale, found_inf, segment_lengths)


def momentum_direction(bufs, buf_scales, block_size, grads, directions, sumsqs, beta, gamma, delta,
                       epsilon) -> None:
    """The momentum pass of Muon, Scion and ROOT over n tensors in one launch, the contract of the CPU op
    ``fastopt::momentum_direction_`` (csrc/cpu/matrix_elementwise.cpp) for a list: B ← β·B + γ·g in place (bufs:
    fp32 / bf16 / fp8 with buf_scales), M = δ·g + ε·B written to directions (fp32 / bf16), and each tensor's Σ M²
    to sumsqs (float64, n elements), summed over its chunks in order (deterministic) by one reduction after the
    kernel."""
    op, n = "momentum_direction", len(grads)
    if n == 0:
        return
    device, gdtype, bdtype = grads[0].device, grads[0].dtype, bufs[0].dtype if bufs else None
    if gdtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{op}: grads must be float32, bfloat16 or float16, got {gdtype}")
    if bdtype not in (torch.float32, torch.bfloat16, torch.float8_e4m3fn):
        raise TypeError(f"{op}: bufs must be float32, bfloat16 or float8_e4m3fn, got {bdtype}")
    ddtype = directions[0].dtype if directions else None
    if ddtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"{op}: directions must be float32 or bfloat16, got {ddtype}")
    fp8 = bdtype == torch.float8_e4m3fn
    if fp8 and block_size not in FP8_BLOCK_SIZES:
        raise ValueError(f"{op} (triton): fp8 block_size must be one of {FP8_BLOCK_SIZES}, got {block_size}")
    if sumsqs.device != device or sumsqs.dtype != torch.float64 or sumsqs.shape != (n,):
        raise ValueError(f"{op}: sumsqs must be a float64 tensor of shape ({n},) on {device}, got {sumsqs.dtype} "
                         f"{tuple(sumsqs.shape)} on {sumsqs.device}")
    numels = tuple(g.numel() for g in grads)
    lists = (directions, grads, bufs, [], [], [], buf_scales, [], [], [], [], [], [], [], [])

    def validate():
        _check_list(op, "grads", grads, n, device, gdtype)
        _check_list(op, "bufs", bufs, n, device, bdtype, numels=numels)
        _check_list(op, "directions", directions, n, device, ddtype, numels=numels)
        _check_list(op, "buf_scales", buf_scales, n if fp8 else 0, device, torch.float32,
                    numels=[-(-ne // block_size) for ne in numels] if fp8 else None)
        if device.type != "cuda" and isinstance(momentum_direction_kernel, triton.runtime.JITFunction):
            raise ValueError(f"{op} (triton): tensors are on {device}; the compiled kernel needs CUDA tensors "
                             "(CPU tensors run only under TRITON_INTERPRET=1)")

    key = (op, device, gdtype, bdtype, ddtype, block_size if fp8 else 0, tuple(map(len, lists)), numels,
           tuple(t.data_ptr() for lst in lists for t in lst))
    ptr_table, aligned = _cached(_PTR_TABLES, key, lambda: validate() or _build_ptr_table(n, lists, numels, device))
    chunk = max(CHUNK, block_size) if fp8 else CHUNK
    chunk_table = _cached(_CHUNK_TABLES, (device, numels, chunk), lambda: _build_chunk_table(numels, chunk, device))
    max_chunks = max(-(-ne // chunk) for ne in numels)
    partials = torch.zeros(n, max_chunks, dtype=torch.float64, device=device)
    if chunk_table.shape[0]:
        momentum_direction_kernel[(chunk_table.shape[0],)](
            ptr_table, chunk_table, partials, max_chunks, float(beta), float(gamma), float(delta), float(epsilon),
            GRAD_DTYPE=_FMT[gdtype], BUF_DTYPE=_FMT[bdtype], OUT_DTYPE=_FMT[ddtype], ALIGNED=aligned, CHUNK=chunk,
            BLOCK_Q=block_size if fp8 else chunk, num_warps=NUM_WARPS * chunk // CHUNK, maxnreg=MAX_REGISTERS)
    torch.sum(partials, 1, out=sumsqs)


def compile_specs():
    """(name, jit_fn, signature, constexprs) for every shipped configuration: rule x param dtype x state dtype x
    (default | all options | cautious counting pass (not Sophia, Adam-mini) | MARS sums-of-squares pass).

    The all-options specs switch on every optional feature of the rule (amsgrad, NAdamW, maximize, lr tensor,
    grad_scale, found_inf, master weights for bf16/fp16 params, stochastic rounding for bf16, the cautious update
    pass; Sophia and Adam-mini have neither amsgrad nor cautious) so each code path compiles; the counting and
    squares passes compile too. fp8 specs use block 128 by default and 256 with all options. Then the momentum
    pass: grad dtype x buffer dtype x direction dtype (fp8 buffers in blocks of 128). Compile with
    num_warps=NUM_WARPS and maxnreg=MAX_REGISTERS.
    """
    sig = {"ptr_table": "*i64", "chunk_table": "*i32", "counts_ptr": "*i64", "sums_ptr": "*fp32", "lr_ptr": "*fp32",
           "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32", "lr": "fp32", "beta1": "fp32", "beta2": "fp32",
           "eps": "fp32", "weight_decay": "fp32", "log_beta1": "fp32", "log_beta2": "fp32", "rule_coef": "fp32",
           "sr_seed": "i32"}
    passes = {"": UPDATE, "_all": UPDATE, "_count": COUNT, "_squares": SQUARES}
    variants = {ADAM: ("", "_all", "_count"), LION: ("", "_all", "_count"), MARS: ("", "_all", "_count", "_squares"),
                SOPHIA: ("", "_all"), ADAM_MINI: ("", "_all")}
    specs = []
    for rule, math_id in (("adam", ADAM), ("lion", LION), ("mars", MARS), ("sophia", SOPHIA),
                          ("adam_mini", ADAM_MINI)):
        for pname, pfmt in (("fp32", F32), ("bf16", BF16), ("fp16", F16)):
            for sname, sfmt in (("fp32", F32), ("bf16", BF16), ("fp8", FP8)):
                for variant in variants[math_id]:
                    on = variant == "_all"
                    bq = (256 if on else 128) if sfmt == FP8 else CHUNK
                    c = dict(MATH=math_id, MODE=int(on and math_id == ADAM), PARAM_DTYPE=pfmt, STATE_DTYPE=sfmt,
                             AMSGRAD=on and math_id in (ADAM, MARS), MASTER=on and pfmt != F32, MAXIMIZE=on,
                             HAS_LR_TENSOR=on, HAS_GRAD_SCALE=on, HAS_FOUND_INF=on,
                             CAUTIOUS=on and math_id not in (SOPHIA, ADAM_MINI),
                             PASS=passes[variant], SR=on and pfmt == BF16, ALIGNED=True, CHUNK=CHUNK, BLOCK_Q=bq)
                    name = f"{rule}_p{pname}_s{sname}{variant}"
                    specs.append((name, elementwise_step_kernel, {**sig, **{k: "constexpr" for k in c}}, c))
    momentum_sig = {"ptr_table": "*i64", "chunk_table": "*i32", "partials": "*fp64", "max_chunks": "i32",
                    "beta": "fp32", "gamma": "fp32", "delta": "fp32", "epsilon": "fp32"}
    for gname, gfmt in (("fp32", F32), ("bf16", BF16), ("fp16", F16)):
        for bname, bfmt in (("fp32", F32), ("bf16", BF16), ("fp8", FP8)):
            for dname, dfmt in (("fp32", F32), ("bf16", BF16)):
                c = dict(GRAD_DTYPE=gfmt, BUF_DTYPE=bfmt, OUT_DTYPE=dfmt, ALIGNED=True, CHUNK=CHUNK,
                         BLOCK_Q=128 if bfmt == FP8 else CHUNK)
                specs.append((f"momentum_g{gname}_b{bname}_d{dname}", momentum_direction_kernel,
                              {**momentum_sig, **{k: "constexpr" for k in c}}, c))
    return specs
