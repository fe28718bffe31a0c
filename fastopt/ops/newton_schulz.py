"""The batched Newton-Schulz engine shared by Muon, Scion and ROOT:
``newton_schulz(X, steps=5, coefficients="muon", eps=1e-7, backend="auto", precision="bf16")``.

Math: fastopt.reference.newton_schulz. Coefficient schedules:

* ``"muon"``: (3.4445, −4.7750, 2.0315) at every step (KellerJordan/Muon's quintic);
* ``"polar_express"``: Amsel et al. 2025, one triple per step (the last repeats beyond five),
  normalising by ‖X‖_F·1.02 + 1e-6 as the common implementations do;
* ``"root"``: ROOT's per-shape table keyed by (min dim, max dim), Muon's triple for other shapes;
* or a list of (a, b, c) triples, one per step (a single triple repeats ``steps`` times).

Backends: ``torch`` is the reference iteration. ``cpu`` (needs the CPU extension) runs a stack of small
matrices (min dim < 256) as one batch and larger ones one at a time (there a batched ``bmm`` measured slower
than a loop of ``mm`` on this CPU), spending on those fewer FLOPs than the 4m²n + 2m³ per step of the plain
iteration (``flops``; ``cpu_flops`` counts what it does): symmetric products compute their upper block
triangle only (fastopt.ops.symmetric), and wide matrices take the Gram form, which iterates on m×m matrices
and touches the (m, n) matrix only at restarts (see ``_gram_iteration``); a matrix taken one at a time is not
rescaled first (only cast to the operand dtype), its 1/‖X‖ enters the first products (``_normalised``). ``triton``
(fastopt.triton_kernels.newton_schulz) runs each step as three launches over the whole batch: a symmetric
product computing the upper tile triangle of X·Xᵀ, the same kernel for b·A + c·A·A with the bias fused, and
P·X + a·X; ``triton_flops`` counts them. It takes CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
``auto`` picks ``cpu`` for CPU tensors where the CPU extension is built and, for CUDA tensors, ``cuda`` where
the CUDA extension runs, else ``triton``; else the torch backend with one warning; precision ``"fp64"`` always
runs on the torch backend. ``cuda`` (CUDA tensors, fp32 or bf16) runs each step on cuBLAS over the whole batch:
in fp32, X·Xᵀ and A² (= A·Aᵀ, A symmetric) as SSYRKs computing one triangle, mirrored
(fastopt::symmetric_product_, csrc/cuda/symmetric_product.cu; b·A is the second SYRK's beta term); in bf16 (cuBLAS
has no bf16 SYRK) both as strided-batched GEMMs with fp32 accumulation; then P·X + a·X as one batched GEMM with
a·X its beta term (``cuda_flops`` counts them). ``auto`` prefers ``cuda`` on CUDA tensors: on an H200
(``python -m fastopt bench ns``, one run, README) it was as fast as ``triton`` or faster at 5 of the 6 bf16 shapes
timed and 3 of the 4 fp32 ones; the Triton symmetric products, with 68–77% of the FLOPs, ran slower than
cuBLAS's full products.

``precision``: ``"bf16"`` (bf16 operands; the matmuls accumulate in fp32), ``"fp32"`` (for
testing), or ``"fp64"`` (ground truth, torch backend). The result has the input's dtype, or
``out_dtype`` (e.g. the compute dtype, to skip a conversion the caller does not need).
``norm``: ‖X‖_F per matrix (shape X.shape[:-2]) where the caller has it already (ROOT: from
fastopt.ops.clamp_to_quantile's clamp pass), so that the engine does not reduce X again.
"""

from __future__ import annotations

import functools
import threading
import warnings

import torch

from .. import reference
from .symmetric import symmetric_blocks, symmetric_mm
from ..backends import probe, triton_interpreting

MUON = (3.4445, -4.7750, 2.0315)
POLAR_EXPRESS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))
ROOT = {(2048, 2048): (3.4916, -4.8224, 2.1095), (2048, 3072): (3.4509, -4.5790, 1.9325),
        (2048, 8192): (2.9794, -3.6674, 1.6207), (2048, 16384): (3.1943, -3.8221, 1.5322)}
PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
NS_BACKENDS = ("auto", "cpu", "torch", "triton", "cuda")


def schedule(coefficients, steps: int, shape) -> tuple[list, float, float | None]:
    """(one (a, b, c) per step, norm scale, eps override or None) for a matrix of ``shape`` (m, n)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if coefficients == "muon":
        return [MUON] * steps, 1.0, None
    if coefficients == "polar_express":
        return [POLAR_EXPRESS[min(i, len(POLAR_EXPRESS) - 1)] for i in range(steps)], 1.02, 1e-6
    if coefficients == "root":
        return [ROOT.get((min(shape), max(shape)), MUON)] * steps, 1.0, None
    if isinstance(coefficients, str):
        raise ValueError(f"coefficients must be 'muon', 'polar_express', 'root' or a list of (a, b, c), "
                         f"got {coefficients!r}")
    triples = [tuple(float(v) for v in t) for t in coefficients]
    if not triples or any(len(t) != 3 for t in triples):
        raise ValueError(f"coefficients must be (a, b, c) triples, got {coefficients!r}")
    if len(triples) == 1:
        return triples * steps, 1.0, None
    return triples, 1.0, None


def flops(m: int, n: int, steps: int) -> int:
    """Dense FLOPs of the iteration on one (m, n) matrix, m ≤ n: 4m²n + 2m³ per step."""
    m, n = min(m, n), max(m, n)
    return steps * (4 * m * m * n + 2 * m ** 3)


def triton_flops(m: int, n: int, steps: int, precision: str = "bf16") -> float:
    """FLOPs the Triton kernels spend on one (m, n) matrix, m ≤ n, per step: X·Xᵀ (2m²n) and A·A (2m³) on
    T(T+1)/2 of the T² tiles (T = ⌈m / tile⌉, the tile of ``precision``'s shipped configuration), and P·X
    (2m²n)."""
    from ..triton_kernels.newton_schulz import CONFIGS

    m, n = min(m, n), max(m, n)
    tiles = -(-m // CONFIGS[PRECISIONS[precision]].block_m)
    return steps * ((2 * m * m * n + 2 * m ** 3) * (tiles + 1) / (2 * tiles) + 2 * m * m * n)


def cuda_flops(m: int, n: int, steps: int, precision: str) -> float:
    """FLOPs the cuda backend spends on one (m, n) matrix: in fp32, X·Xᵀ and A·A as SYRKs (one triangle, half of
    their 2m²n + 2m³), P·X dense; in bf16 (cuBLAS has no bf16 SYRK) the dense count."""
    m, n = min(m, n), max(m, n)
    return steps * (3 * m * m * n + m ** 3) if precision == "fp32" else flops(m, n, steps)


@torch.no_grad()
def newton_schulz(x: torch.Tensor, steps: int = 5, coefficients="muon", eps: float = 1e-7, backend: str = "auto",
                  precision: str = "bf16", out_dtype: torch.dtype | None = None,
                  norm: torch.Tensor | None = None) -> torch.Tensor:
    """Orthogonalise a (m, n) matrix or each matrix of a (B, m, n) batch (see the module docstring)."""
    if not isinstance(x, torch.Tensor) or x.ndim not in (2, 3) or not x.is_floating_point() or x.is_complex():
        raise ValueError("newton_schulz takes a real floating-point (m, n) or (B, m, n) tensor, got "
                         f"{type(x).__name__} {getattr(x, 'dtype', '')} {tuple(getattr(x, 'shape', ()))}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if x.is_sparse:
        raise ValueError("newton_schulz does not take sparse tensors")
    if norm is not None and (not isinstance(norm, torch.Tensor) or norm.shape != x.shape[:-2]
                             or norm.device != x.device or not norm.is_floating_point()):
        raise ValueError(f"newton_schulz: norm must be a real floating-point tensor of shape {tuple(x.shape[:-2])} "
                         f"on {x.device} (one Frobenius norm per matrix), got {type(norm).__name__} "
                         f"{tuple(getattr(norm, 'shape', ()))} {getattr(norm, 'device', '')}")
    triples, norm_scale, eps_override = schedule(coefficients, steps, x.shape[-2:])
    eps = eps if eps_override is None else eps_override
    backend = _resolve(backend, x.device, precision)
    dtype, out_dtype = PRECISIONS[precision], out_dtype or x.dtype
    if backend == "torch":
        return reference.newton_schulz(x, triples, eps, norm_scale, dtype, norm).to(out_dtype)
    y, wide, scale = _normalised(x, eps, norm_scale, dtype, norm, fold=backend == "cpu")
    if backend == "triton":
        y = _triton(y, triples, out_dtype)
    elif backend == "cuda":
        y = _cuda(y, triples)
    else:  # a result that .to(out_dtype) copies may stay in the workspace
        y = _cpu(y, triples, scale, in_workspace=out_dtype != dtype)
    return (y if wide else y.mT).to(out_dtype)


def _resolve(backend: str, device: torch.device, precision: str) -> str:
    if backend not in NS_BACKENDS:
        raise ValueError(f"backend must be one of {NS_BACKENDS}, got {backend!r}")
    if backend == "cuda":
        if device.type != "cuda" or precision == "fp64":
            raise ValueError(f"newton_schulz backend 'cuda' needs CUDA tensors and precision 'bf16' or 'fp32', got "
                             f"{device} tensors and {precision!r} (precision='fp64' runs on backend='torch')")
        if not probe("cuda").available:
            raise RuntimeError(f"newton_schulz backend 'cuda' is not available: {probe('cuda').reason}")
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"newton_schulz backend 'cpu' needs CPU tensors, got {device}")
        if not probe("cpu").available:  # the symmetric products' mirror is a kernel of the CPU extension
            raise RuntimeError(f"newton_schulz backend 'cpu' is not available: {probe('cpu').reason}")
    if backend == "triton":
        _check_triton(device, precision)
    if backend == "auto":
        if precision == "fp64":
            return "torch"
        if device.type == "cpu" and probe("cpu").available:
            return "cpu"
        if device.type == "cuda":
            for fused in ("cuda", "triton"):
                if probe(fused).available:
                    return fused
        _warn_torch_fallback(device)
        return "torch"
    return backend


def _check_triton(device: torch.device, precision: str) -> None:
    if precision == "fp64":
        raise ValueError("newton_schulz backend 'triton' computes in bf16 or fp32; precision='fp64' runs on "
                         "backend='torch'")
    if device.type == "cpu" and not triton_interpreting():
        raise ValueError("newton_schulz backend 'triton' needs CUDA tensors, or CPU tensors under "
                         "TRITON_INTERPRET=1; got CPU tensors")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"newton_schulz backend 'triton' needs CUDA tensors, got {device}")
    if device.type == "cuda" and not probe("triton").available:
        raise RuntimeError(f"newton_schulz backend 'triton' is not available: {probe('triton').reason}")


_WARNED = set()


def _warn_torch_fallback(device: torch.device) -> None:
    if device.type not in _WARNED:
        _WARNED.add(device.type)
        why = {"cuda": f"cuda: {probe('cuda').reason}; triton: {probe('triton').reason}",
               "cpu": f"cpu: {probe('cpu').reason}"}.get(device.type, "no kernel for this device")
        warnings.warn(f"fastopt: newton_schulz on {device.type} tensors ({why}); running the torch reference "
                      "iteration (plain matmuls)", stacklevel=3)


FOLD_NORMS = (1e-10, 1e10)  # ‖X‖_F range in which the CPU engine scales inside its products (see _normalised)


def _normalised(x, eps, norm_scale, dtype, norm=None, fold=False):
    """(Y·s in ``dtype``, whether Y = x, 1.0) with Y = x or xᵀ so that m ≤ n and s = 1 / (‖Y‖_F·norm_scale + eps)
    per matrix. ``norm``: ‖x‖_F per matrix where the caller gives it. With ``fold`` (the CPU engine), matrices
    that it iterates one at a time (not ``cpu_batches``) with norms in FOLD_NORMS come back unscaled, only cast to
    ``dtype``, as (Y, wide, s), s a float (or a list of them for a stack): the iteration applies s in its first
    products (alpha and beta of the GEMMs), a pass over the matrix fewer (and for a float32 input no float32
    intermediate: 2048² bf16 NS of a float32 input 138 → 131 ms, alternating, medians of 11). A stack of small
    matrices, one batched product for all, cannot take one s per matrix, so a small matrix alone is scaled first
    too (a stack and its matrices one by one give the same bits); outside FOLD_NORMS Y·Yᵀ could overflow or
    underflow float32 before s scales it."""
    wide = x.size(-2) <= x.size(-1)
    y = x if wide else x.mT
    if norm is not None:
        norm = norm.view(*norm.shape, 1, 1)
    if y.device.type != "cpu":
        return _scaled_without_sync(y, eps, norm_scale, dtype, norm), wide, 1.0
    if norm is None:
        # the norm in the input's precision (a float64 reduction costs as much as a bf16 cast here), again in
        # float64 where the squares overflowed
        norm = torch.linalg.vector_norm(y, dim=(-2, -1), keepdim=True)
        if not torch.isfinite(norm).all():
            norm = torch.linalg.vector_norm(y, dim=(-2, -1), keepdim=True, dtype=torch.float64)
    factor = 1 / (norm.double() * norm_scale + eps)
    if fold and not cpu_batches(*y.shape[-2:]) and FOLD_NORMS[0] <= norm.min() and norm.max() <= FOLD_NORMS[1]:
        return y.to(dtype), wide, factor.item() if y.ndim == 2 else factor.flatten().tolist()
    # scale in the input's dtype (no float64 copy of the matrices) unless the factor would underflow it; then cast
    # (a mul writing bf16 from float32 directly measured slower than the two passes)
    scaled = y * factor.to(y.dtype) if factor.min() >= torch.finfo(y.dtype).tiny else y * factor
    return scaled.to(dtype), wide, 1.0


def _scaled_without_sync(y, eps, norm_scale, dtype, norm=None):
    """y / (‖y‖_F·norm_scale + eps) per matrix with no host synchronisation (GPU): the norm (unless given) in
    float64 (no overflow), the factor applied as two float32 halves (neither underflows where the whole factor
    would)."""
    if norm is None:
        norm = torch.linalg.vector_norm(y, dim=(-2, -1), keepdim=True, dtype=torch.float64)
    half = (1 / (norm.double() * norm_scale + eps)).sqrt().float()
    return (y.float() * half * half).to(dtype)


def _triton(y, triples, out_dtype):
    """The Triton kernels on the normalised (m, n) or (B, m, n) y, m ≤ n; in ``out_dtype`` where the kernels
    write it directly, else in y's dtype."""
    from ..triton_kernels.newton_schulz import OUT_DTYPES, newton_schulz as launch

    out = launch(y if y.ndim == 3 else y[None], triples, out_dtype if out_dtype in OUT_DTYPES else y.dtype)
    return out if y.ndim == 3 else out[0]


def _cuda(y, triples):
    """cuBLAS on the normalised (m, n) or (B, m, n) y, m ≤ n (see the module docstring), in y's dtype."""
    z = (y if y.ndim == 3 else y[None]).contiguous()
    for a, b, c in triples:
        if z.dtype == torch.float32:
            gram = z.new_empty(z.shape[0], z.shape[1], z.shape[1])
            torch.ops.fastopt.symmetric_product_(gram, z, 1.0, 0.0, False)  # X·Xᵀ
            poly = gram.clone()
            torch.ops.fastopt.symmetric_product_(poly, gram, c, b, False)  # b·A + c·A·Aᵀ
        else:
            gram = torch.bmm(z, z.mT)
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        z = torch.baddbmm(z, poly, z, beta=a)
    return z if y.ndim == 3 else z[0]


def _cpu(y, triples, scale=1.0, in_workspace=False):
    """On the normalised (m, n) or (B, m, n) y, m ≤ n (for one matrix: X₀ = scale·y): a stack of small matrices as
    one batch (``cpu_batches``), else the iteration one matrix at a time (dense or Gram form, whichever counts
    fewer FLOPs); in y's dtype. ``scale``: one per matrix for a stack (a float: the same for all).
    ``in_workspace``: one matrix's result may be the dense iteration's workspace (the caller copies it before the
    next call)."""
    m, n = y.shape[-2:]
    if y.ndim == 3 and cpu_batches(m, n):
        return _batched_iteration(y, triples)
    iterate = _gram_iteration if cpu_form(m, n, len(triples), _precision(y.dtype)) == "gram" else _dense_iteration
    if y.ndim == 2:
        return iterate(y, triples, scale, in_workspace)
    out = torch.empty_like(y)
    for matrix, result, s in zip(y, out, scale if isinstance(scale, list) else [scale] * len(y)):
        result.copy_(iterate(matrix, triples, s, in_workspace=True))
    return out


BATCH_MAX_ROWS = 256  # below it a batch of products beats a loop of (blocked) ones: the per-product overhead
# dominates. Measured (2-core Zen 4, bf16, 5 steps): 8 × (64, 64) 0.65 vs 5.0 ms, 8 × (128, 512) 4.6 vs 10.2 ms;
# from (256, 256) on about even, and at (256, 1024) the Gram-form loop beats a batch (15 vs 23 ms).


def cpu_batches(m: int, n: int) -> bool:
    """Whether the CPU engine iterates a stack of (m, n) matrices as one batch (else one at a time)."""
    return min(m, n) < BATCH_MAX_ROWS


def _batched_iteration(x, triples):
    """The dense iteration on a (B, m, n) stack, each product one batched call."""
    for a, b, c in triples:
        gram = torch.bmm(x, x.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    return x


RESTART_EVERY = 2  # the Gram form rebuilds X and its Gram matrix every 2 steps (see _gram_iteration)
GRAM_MIN_ROWS = 128  # below it the Gram form measured no faster (its products are too small to gain)


def _dense_iteration(x, triples, scale=1.0, in_workspace=False):
    """A = X·Xᵀ; B = b·A + c·A²; X ← a·X + B·X (the two symmetric products blocked), from X₀ = scale·x. Every
    step but the last writes into the thread's workspace (``_workspace``), the last into a fresh tensor (unless
    ``in_workspace``: there too)."""
    gram_buffer, poly_buffer, *x_buffers = _workspace(*x.shape, x.dtype)
    for i, (a, b, c) in enumerate(triples):
        gram = symmetric_mm(x, x.mT, alpha=scale * scale, out=gram_buffer)
        poly = symmetric_mm(gram, gram, gram, beta=b, alpha=c, out=poly_buffer)
        out = x_buffers[i % 2] if i + 1 < len(triples) or in_workspace else None
        x = torch.addmm(x, poly, x, beta=a * scale, alpha=scale, out=out)
        scale = 1.0
    return x


_WORKSPACE = threading.local()


def _workspace(m: int, n: int, dtype: torch.dtype) -> list:
    """[A, B (m×m), X, X' (m×n)] buffers of ``dtype`` for the dense iteration, kept per thread for the last shape
    asked (2m² + 2mn elements: 32 MB at 2048² in bf16). Fresh buffers at every step cost their page faults: at
    2048² bf16 a call took 164 ms with them and 147 with the workspace (same bits; alternating, medians of 9)."""
    key = (m, n, dtype)
    if getattr(_WORKSPACE, "key", None) != key:
        _WORKSPACE.key = key
        _WORKSPACE.buffers = [torch.empty(m, m, dtype=dtype), torch.empty(m, m, dtype=dtype),
                              torch.empty(m, n, dtype=dtype), torch.empty(m, n, dtype=dtype)]
    return _WORKSPACE.buffers


def _gram_iteration(x, triples, scale=1.0, in_workspace=False):
    """The same iteration on m×m matrices only (Gram Newton-Schulz, Dao AI Lab 2026): each step's X is
    Q·X₀ with Q a polynomial in A₀ = X₀·X₀ᵀ, so with h = a·I + b·A + c·A² it keeps

        Q ← Q·h,  A ← h·A·h (= (A·h)·h: h and A commute)

    touching the (m, n) matrix only to form A₀ and, at the end, Q·X₀: 4m²n FLOPs in all for the
    rectangular products instead of 4m²n per step.
    Every m×m product is symmetric. In bf16, A drifts from (Q·X₀)(Q·X₀)ᵀ, and a rounding-born negative
    eigenvalue λ of A grows each step (h(λ) > a for λ < 0) until it diverges; so every RESTART_EVERY
    steps X₀ ← Q·X₀ and A is recomputed from it. Measured against the fp64 iteration: restarting every
    2 steps is as accurate as the dense bf16 iteration, for 5 and 10 steps; every 3 diverged at 10.
    X₀ = scale·x: the scale enters A₀ and the first Q·x. (``in_workspace``: as ``_dense_iteration``'s signature;
    this form has no workspace, its result is always fresh.)"""
    steps = len(triples)
    gram, q = symmetric_mm(x, x.mT, alpha=scale * scale), None
    for i, (a, b, c) in enumerate(triples):
        if i and i % RESTART_EVERY == 0:
            x, q, scale = _scaled_mm(q, x, scale), None, 1.0
            gram = symmetric_mm(x, x.mT)
        h = symmetric_mm(gram, gram, gram, beta=b, alpha=c)
        h.diagonal().add_(a)
        q = h if q is None else symmetric_mm(q, h)
        if i + 1 < steps and (i + 1) % RESTART_EVERY:
            gram = symmetric_mm(symmetric_mm(gram, h), h)
    return _scaled_mm(q, x, scale)


def _scaled_mm(q, x, scale):
    """scale·(q·x)."""
    return q @ x if scale == 1.0 else torch.addmm(x, q, x, beta=0.0, alpha=scale)


def _precision(dtype: torch.dtype) -> str:
    return next(name for name, d in PRECISIONS.items() if d == dtype)


def _product_flops(m: int, k: int, n: int, symmetric: bool, precision: str) -> float:
    dense = 2 * m * k * n
    blocks = symmetric_blocks(m, PRECISIONS[precision]) if symmetric else 1
    return dense * (blocks + 1) / (2 * blocks)


def cpu_flops(m: int, n: int, steps: int, form: str | None = None, precision: str = "bf16") -> float:
    """FLOPs the CPU engine spends on one (m, n) matrix run alone in ``precision`` (its symmetric blocking
    depends on the dtype and the CPU: fastopt.ops.symmetric), in its dense or Gram form (default: its choice);
    in a stack it batches (``cpu_batches``) each matrix costs the plain ``flops``."""
    m, n = min(m, n), max(m, n)
    form = form or cpu_form(m, n, steps, precision)
    product = functools.partial(_product_flops, precision=precision)
    if form == "dense":
        return steps * (product(m, n, m, True) + product(m, m, m, True) + 2 * m * m * n)
    restarts = (steps - 1) // RESTART_EVERY
    gram_products = 1 + restarts  # X·Xᵀ
    square_products = steps  # A² per step
    square_products += steps - (1 + restarts)  # Q·h, but at the first step after each (re)start
    square_products += 2 * (steps - 1 - restarts)  # (A·h)·h, but before each restart and at the end
    return (gram_products * product(m, n, m, True) + (1 + restarts) * 2 * m * m * n
            + square_products * product(m, m, m, True))


def cpu_form(m: int, n: int, steps: int, precision: str = "bf16") -> str:
    """"gram" where the Gram form counts fewer FLOPs than the dense iteration (wide matrices of at least
    GRAM_MIN_ROWS rows), else "dense"."""
    m, n = min(m, n), max(m, n)
    fewer = cpu_flops(m, n, steps, "gram", precision) < cpu_flops(m, n, steps, "dense", precision)
    return "gram" if m >= GRAM_MIN_ROWS and fewer else "dense"
