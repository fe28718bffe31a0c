"""The Newton-Schulz iteration in Triton, for a (B, m, n) batch of matrices X (m ≤ n, already normalised):

    for (a, b, c) in triples:  A = X·Xᵀ;  P = b·A + c·A·A;  X ← a·X + P·X

three launches per step, each covering the whole batch (grid axis 1 is the matrix; strides are arguments):

* ``symmetric_product_kernel`` (SYRK): C = alpha·A·Aᵀ + beta·Bias for a (B, m, k) operand A and a symmetric
  (B, m, m) Bias. Only the T(T+1)/2 tiles on and above the diagonal of the T×T tile grid are computed (program p
  takes tile (i, j), p = j(j+1)/2 + i, i ≤ j); each is stored at (i, j) and, transposed, at (j, i), so C is
  exactly symmetric (a diagonal tile keeps its upper triangle and mirrors it). It computes A = X·Xᵀ (alpha 1,
  no bias) and, since A is symmetric so that A·A = A·Aᵀ, P = c·A·Aᵀ + b·A (operand and bias A): the epilogue
  is fused.
* ``product_add_kernel`` (GEMM with a fused epilogue): X' = P·X + alpha·X, alpha = a.

Numerics: bf16 operands (A, P and the iterates X are stored in bf16) with fp32 accumulation, or fp32 operands
with IEEE fp32 products (``input_precision="ieee"``, not tf32; the testing mode). The last step writes its
result in the requested output dtype directly from the fp32 accumulator.

Configurations are fixed per operand dtype (``CONFIGS``), sized for A100 (sm_80) and H100 (sm_90): bf16 uses
128×128 tiles with a K step of 64, 8 warps and 3 pipeline stages (64 KiB of shared memory on sm_80, 96 KiB on
sm_90; mma.sync / wgmma), fp32 64×64×32, 4 warps, 2 stages. ``newton_schulz`` runs every launch on sizes and
strides that are multiples of 16 (zero-padding the batch where they are not), so the JIT always picks the aligned
specialisation, the one ``compile_specs()`` lists for the compile tests.

The kernels use Triton builtins only, none of triton.language.standard's @jit functions (tl.zeros, tl.cdiv): those
are decorated when triton is imported, so they break a kernel interpreted in a process that imported triton in
compiled mode (the tests run both).
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl


class Config(NamedTuple):
    """Tile sizes and launch options: the symmetric kernel uses block_m × block_m tiles, the product kernel
    block_m × block_n; both step K by block_k. max_registers (per thread, Triton's maxnreg) is the hardware's
    255: left to itself, ptxas capped the fp32 product at 96 registers on sm_90 and spilled."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    max_registers: int


CONFIGS = {torch.bfloat16: Config(128, 128, 64, 8, 3, 255), torch.float32: Config(64, 64, 32, 4, 2, 255)}
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what the last step can write directly
ALIGN = 16  # newton_schulz runs on sizes and strides that are multiples of 16, from 16-byte-aligned addresses
MAX_BATCH = 65535  # CUDA's limit on grid axis 1

# Read when this module is imported, as @triton.jit reads it when it decorates the kernels below.
_INTERPRETED = tl.constexpr(triton.knobs.runtime.interpret)


@triton.jit
def _dot(x, y, acc):
    """acc + x·y with fp32 accumulation (and IEEE fp32 products for fp32 operands)."""
    if _INTERPRETED:  # the interpreter's tl.dot multiplies bf16 bit patterns as integers: give it fp32
        x = x.to(tl.float32)
        y = y.to(tl.float32)
    return tl.dot(x, y, acc, input_precision="ieee")


@triton.jit
def _upper_tile(p):
    """(i, j), i ≤ j, with p = j(j+1)/2 + i: the upper triangle of a tile grid enumerated column by column
    (exact while (j+1)(j+2) < 2^31, j < 46339; the launcher keeps m² < 2^31, so with tiles of 16 rows or more
    j < 2897)."""
    j = ((tl.sqrt(p.to(tl.float32) * 8.0 + 1.0) - 1.0) * 0.5).to(tl.int32)
    j = tl.where(j * (j + 1) // 2 > p, j - 1, j)  # the fp32 square root may land one off either way
    j = tl.where((j + 1) * (j + 2) // 2 <= p, j + 1, j)
    return p - j * (j + 1) // 2, j


@triton.jit
def symmetric_product_kernel(a_ptr, bias_ptr, out_ptr, M, K, alpha, beta,
                             stride_ab, stride_am, stride_ak, stride_cb, stride_cm, stride_cn,
                             stride_ob, stride_om, stride_on,
                             HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[b] = alpha·A[b]·A[b]ᵀ (+ beta·bias[b]) for A (B, M, K), bias and out (B, M, M); grid
    (T(T+1)/2, B), T = ⌈M / BLOCK⌉."""
    ti, tj = _upper_tile(tl.program_id(0))
    batch = tl.program_id(1).to(tl.int64)
    rows = ti * BLOCK + tl.arange(0, BLOCK)
    cols = tj * BLOCK + tl.arange(0, BLOCK)
    ks = tl.arange(0, BLOCK_K)
    a_ptr += batch * stride_ab
    # rows past M read row (index mod M): no mask but on K; their results are never stored
    lhs = a_ptr + (rows % M)[:, None] * stride_am + ks[None, :] * stride_ak
    rhs = a_ptr + (cols % M)[None, :] * stride_am + ks[:, None] * stride_ak
    acc = tl.full((BLOCK, BLOCK), 0.0, tl.float32)
    for k in range(0, K, BLOCK_K):
        x = tl.load(lhs, mask=ks[None, :] < K - k, other=0.0)
        y = tl.load(rhs, mask=ks[:, None] < K - k, other=0.0)
        acc = _dot(x, y, acc)
        lhs += BLOCK_K * stride_ak
        rhs += BLOCK_K * stride_ak
    acc *= alpha
    inside = (rows[:, None] < M) & (cols[None, :] < M)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + batch * stride_cb + rows[:, None] * stride_cm + cols[None, :] * stride_cn,
                       mask=inside, other=0.0)
        acc += beta * bias.to(tl.float32)
    c = acc.to(out_ptr.dtype.element_ty)
    c_t = tl.trans(c)
    # a diagonal tile keeps its upper triangle and mirrors it (off the diagonal rows < cols: c itself)
    c = tl.where(rows[:, None] <= cols[None, :], c, c_t)
    out_ptr += batch * stride_ob
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on, c, mask=inside)
    # an off-diagonal tile, transposed, at its mirror position (j, i)
    tl.store(out_ptr + cols[:, None] * stride_om + rows[None, :] * stride_on, c_t, mask=tl.trans(inside) & (ti < tj))


@triton.jit
def product_add_kernel(p_ptr, x_ptr, out_ptr, M, N, alpha,
                       stride_pb, stride_pm, stride_pk, stride_xb, stride_xm, stride_xn,
                       stride_ob, stride_om, stride_on,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[b] = P[b]·X[b] + alpha·X[b] for P (B, M, M), X and out (B, M, N);
    grid (⌈M/BLOCK_M⌉·⌈N/BLOCK_N⌉, B)."""
    pid = tl.program_id(0)
    tiles_m = (M + BLOCK_M - 1) // BLOCK_M
    ti = pid % tiles_m  # consecutive programs share a column block of X (P is small: it stays in L2)
    tj = pid // tiles_m
    batch = tl.program_id(1).to(tl.int64)
    rows = ti * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tj * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    p_ptr += batch * stride_pb
    x_ptr += batch * stride_xb
    lhs = p_ptr + (rows % M)[:, None] * stride_pm + ks[None, :] * stride_pk
    rhs = x_ptr + ks[:, None] * stride_xm + (cols % N)[None, :] * stride_xn
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k in range(0, M, BLOCK_K):
        p = tl.load(lhs, mask=ks[None, :] < M - k, other=0.0)
        x = tl.load(rhs, mask=ks[:, None] < M - k, other=0.0)
        acc = _dot(p, x, acc)
        lhs += BLOCK_K * stride_pk
        rhs += BLOCK_K * stride_xm
    inside = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=inside, other=0.0)
    acc += alpha * x.to(tl.float32)
    out_ptr += batch * stride_ob
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=inside)


# ----------------------------------------------------------------------------- host side
def _check(name, t, shape, dtypes, device):
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"newton_schulz (triton): {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"newton_schulz (triton): {name} has dtype {t.dtype}, expected one of {dtypes}")
    if t.device != device:
        raise ValueError(f"newton_schulz (triton): {name} is on {t.device}, expected {device}")


def _check_operand(name, t):
    if t.ndim != 3:
        raise ValueError(f"newton_schulz (triton): {name} must be a (B, m, n) batch, got shape {tuple(t.shape)}")
    if t.dtype not in CONFIGS:
        raise TypeError(f"newton_schulz (triton): {name} must be bfloat16 or float32, got {t.dtype}")
    if t.device.type != "cuda" and isinstance(symmetric_product_kernel, triton.runtime.JITFunction):
        raise ValueError(f"newton_schulz (triton): {name} is on {t.device}; the compiled kernels need CUDA tensors "
                         "(CPU tensors run only under TRITON_INTERPRET=1)")
    if t.shape[0] > MAX_BATCH:
        raise ValueError(f"newton_schulz (triton): at most {MAX_BATCH} matrices per launch, got {t.shape[0]}")
    if t.shape[1] * max(t.shape[1:]) >= 2 ** 31:
        raise ValueError(f"newton_schulz (triton): {name} is {t.shape[1]}x{t.shape[2]}: its matrices or their "
                         f"{t.shape[1]}x{t.shape[1]} products have 2^31 elements or more (offsets are 32-bit)")


def symmetric_product(a, out, alpha=1.0, bias=None, beta=0.0, config=None):
    """out = alpha·A·Aᵀ + beta·bias on each matrix of the (B, m, k) batch ``a`` (bias: symmetric, (B, m, m), or
    None), in one launch; ``config`` defaults to CONFIGS[a.dtype]."""
    _check_operand("a", a)
    batch, m, k = a.shape
    _check("out", out, (batch, m, m), (a.dtype,), a.device)
    if bias is not None:
        _check("bias", bias, (batch, m, m), (a.dtype,), a.device)
    config = config or CONFIGS[a.dtype]
    tiles = triton.cdiv(m, config.block_m)
    c = a if bias is None else bias
    symmetric_product_kernel[(tiles * (tiles + 1) // 2, batch)](
        a, c, out, m, k, float(alpha), float(beta), *a.stride(), *c.stride(), *out.stride(),
        HAS_BIAS=bias is not None, BLOCK=config.block_m, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages, maxnreg=config.max_registers)
    return out


def product_add(p, x, alpha, out, config=None):
    """out = P·X + alpha·X on each matrix of the batch (P (B, m, m), X and out (B, m, n)), in one launch;
    ``config`` defaults to CONFIGS[x.dtype]."""
    _check_operand("x", x)
    batch, m, n = x.shape
    _check("p", p, (batch, m, m), (x.dtype,), x.device)
    _check("out", out, (batch, m, n), OUT_DTYPES, x.device)
    config = config or CONFIGS[x.dtype]
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n), batch)
    product_add_kernel[grid](
        p, x, out, m, n, float(alpha), *p.stride(), *x.stride(), *out.stride(),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages, maxnreg=config.max_registers)
    return out


def newton_schulz(x, triples, out_dtype):
    """The iteration of the module docstring on the normalised (B, m, n) batch ``x`` (bfloat16 or float32 operands;
    m ≤ n is the cheap orientation), one (a, b, c) per step; returns a (B, m, n) tensor of ``out_dtype`` (one of
    OUT_DTYPES), a view of a padded one where x's sizes are not multiples of ALIGN.

    Zero rows and columns stay zero through the iteration and change nothing else, so any other x runs as a
    zero-padded contiguous copy: every launch then gets the JIT's aligned specialisation, the one compile_specs()
    lists (unaligned ones measured up to 48 bytes of spills with the bf16 tiles)."""
    _check_operand("x", x)
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"newton_schulz (triton): out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=out_dtype, device=x.device)
    batch, m, n = x.shape
    rows, cols = -(-m // ALIGN) * ALIGN, -(-n // ALIGN) * ALIGN
    if (rows, cols) != (m, n) or not x.is_contiguous() or x.data_ptr() % ALIGN:
        padded = x.new_zeros(batch, rows, cols)
        padded[:, :m, :n] = x
        return newton_schulz(padded, triples, out_dtype)[:, :m, :n]
    gram = x.new_empty(batch, m, m)
    poly = x.new_empty(batch, m, m)
    for step, (a, b, c) in enumerate(triples):
        symmetric_product(x, gram)                             # A = X·Xᵀ
        symmetric_product(gram, poly, c, bias=gram, beta=b)    # P = c·A·A + b·A
        last = step == len(triples) - 1
        x = product_add(poly, x, a, x.new_empty(batch, m, n, dtype=out_dtype if last else x.dtype))
    return x


_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def compile_specs():
    """(name, kernel, signature, constexprs, attrs, options) of every shipped configuration: per operand dtype, the
    symmetric product without and with its bias, and the product for each output dtype. Specialised as the JIT
    specialises a contiguous batch of matrices whose sizes are multiples of 16: unit strides constexpr 1, the
    pointers and the other sizes and strides divisible by 16."""
    specs = []
    for dtype, config in CONFIGS.items():
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages, "maxnreg": config.max_registers}
        op = f"*{_NAMES[dtype]}"
        # fp32 with a bias and a transposed operand (unit stride along rows): the Kronecker factor
        # R ← βR + (1−β)GᵀG of fastopt.ops.kron_factor_update
        variants = [(False, False), (True, False)] + ([(True, True)] if dtype == torch.float32 else [])
        for has_bias, transposed in variants:
            unit, strided = ("stride_am", "stride_ak") if transposed else ("stride_ak", "stride_am")
            sig = {"a_ptr": op, "bias_ptr": op, "out_ptr": op, "M": "i32", "K": "i32", "alpha": "fp32", "beta": "fp32",
                   "stride_ab": "i32", strided: "i32", "stride_cb": "i32", "stride_cm": "i32", "stride_ob": "i32",
                   "stride_om": "i32"}
            constexprs = {unit: 1, "stride_cn": 1, "stride_on": 1, "HAS_BIAS": has_bias,
                          "BLOCK": config.block_m, "BLOCK_K": config.block_k}
            name = f"symmetric_{_NAMES[dtype]}{'_bias' if has_bias else ''}{'_transposed' if transposed else ''}"
            specs.append((name, symmetric_product_kernel, {**sig, **dict.fromkeys(constexprs, "constexpr")},
                          constexprs, _aligned(symmetric_product_kernel, sig), options))
        for out_dtype in OUT_DTYPES:
            sig = {"p_ptr": op, "x_ptr": op, "out_ptr": f"*{_NAMES[out_dtype]}", "M": "i32", "N": "i32",
                   "alpha": "fp32", "stride_pb": "i32", "stride_pm": "i32", "stride_xb": "i32", "stride_xm": "i32",
                   "stride_ob": "i32", "stride_om": "i32"}
            constexprs = {"stride_pk": 1, "stride_xn": 1, "stride_on": 1, "BLOCK_M": config.block_m,
                          "BLOCK_N": config.block_n, "BLOCK_K": config.block_k}
            specs.append((f"product_{_NAMES[dtype]}_out_{_NAMES[out_dtype]}", product_add_kernel,
                          {**sig, **dict.fromkeys(constexprs, "constexpr")}, constexprs,
                          _aligned(product_add_kernel, sig), options))
    return specs


def _aligned(kernel, signature):
    """ASTSource attrs: every pointer and integer argument of ``signature`` divisible by 16."""
    return {(kernel.arg_names.index(name),): [["tt.divisibility", 16]]
            for name, ty in signature.items() if ty.startswith("*") or ty == "i32"}
