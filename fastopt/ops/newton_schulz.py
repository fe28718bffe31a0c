"""The batched Newton-Schulz engine shared by Muon, Scion and ROOT:
``newton_schulz(X, steps=5, coefficients="muon", eps=1e-7, backend="auto", precision="bf16")``.

Math: fastopt.reference.newton_schulz. Coefficient schedules:

* ``"muon"``: (3.4445, −4.7750, 2.0315) at every step (KellerJordan/Muon's quintic);
* ``"polar_express"``: Amsel et al. 2025, one triple per step (the last repeats beyond five),
  normalising by ‖X‖_F·1.02 + 1e-6 as the common implementations do;
* ``"root"``: ROOT's per-shape table keyed by (min dim, max dim), Muon's triple for other shapes;
* or a list of (a, b, c) triples, one per step (a single triple repeats ``steps`` times).

Backends: ``torch`` is the reference iteration; ``cpu`` runs the same iteration one matrix at a
time (a batched ``bmm`` measured slower than a loop of ``mm`` on this CPU) with each step's two
updates fused into ``addmm`` calls, B = b·A + c·A·A and X ← a·X + B·X. The Triton and CUDA
kernels (symmetric products computed once) are not built yet: ``auto`` runs CUDA tensors on the
torch backend, with one warning, and asking for ``triton`` or ``cuda`` raises.

``precision``: ``"bf16"`` (bf16 operands; the matmuls accumulate in fp32), ``"fp32"`` (for
testing), or ``"fp64"`` (ground truth, torch backend). The result has the input's dtype, or
``out_dtype`` (e.g. the compute dtype, to skip a conversion the caller does not need).
"""

from __future__ import annotations

import warnings

import torch

from .. import reference

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


@torch.no_grad()
def newton_schulz(x: torch.Tensor, steps: int = 5, coefficients="muon", eps: float = 1e-7, backend: str = "auto",
                  precision: str = "bf16", out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Orthogonalise a (m, n) matrix or each matrix of a (B, m, n) batch (see the module docstring)."""
    if not isinstance(x, torch.Tensor) or x.ndim not in (2, 3) or not x.is_floating_point() or x.is_complex():
        raise ValueError("newton_schulz takes a real floating-point (m, n) or (B, m, n) tensor, got "
                         f"{type(x).__name__} {getattr(x, 'dtype', '')} {tuple(getattr(x, 'shape', ()))}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if x.is_sparse:
        raise ValueError("newton_schulz does not take sparse tensors")
    triples, norm_scale, eps_override = schedule(coefficients, steps, x.shape[-2:])
    eps = eps if eps_override is None else eps_override
    backend = _resolve(backend, x.device, precision)
    dtype, out_dtype = PRECISIONS[precision], out_dtype or x.dtype
    if backend == "torch":
        return reference.newton_schulz(x, triples, eps, norm_scale, dtype).to(out_dtype)
    return _cpu(x, triples, eps, norm_scale, dtype).to(out_dtype)


def _resolve(backend: str, device: torch.device, precision: str) -> str:
    if backend not in NS_BACKENDS:
        raise ValueError(f"backend must be one of {NS_BACKENDS}, got {backend!r}")
    if backend in ("triton", "cuda"):
        raise NotImplementedError(f"newton_schulz has no {backend} kernel yet (fastopt issue 4); "
                                  "backend='torch' runs the reference iteration on any device")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"newton_schulz backend 'cpu' needs CPU tensors, got {device}")
    if backend == "auto":
        if device.type == "cpu" and precision != "fp64":
            return "cpu"
        if device.type != "cpu":
            _warn_torch_fallback(device)
        return "torch"
    return backend


_WARNED = set()


def _warn_torch_fallback(device: torch.device) -> None:
    if device.type not in _WARNED:
        _WARNED.add(device.type)
        warnings.warn(f"fastopt: newton_schulz has no {device.type} kernel yet; running the torch reference "
                      "iteration (plain matmuls)", stacklevel=3)


def _cpu(x, triples, eps, norm_scale, dtype):
    """The iteration one matrix at a time with fused addmm updates; returns x's shape, in ``dtype``."""
    wide = x.size(-2) <= x.size(-1)
    y = x if wide else x.mT
    # the norm in the input's precision (a float64 reduction costs as much as a bf16 cast here), again in
    # float64 where the squares overflowed
    norm = torch.linalg.vector_norm(y, dim=(-2, -1), keepdim=True)
    if not torch.isfinite(norm).all():
        norm = torch.linalg.vector_norm(y, dim=(-2, -1), keepdim=True, dtype=torch.float64)
    factor = 1 / (norm.double() * norm_scale + eps)
    # scale in the input's dtype (one pass, no float64 copy of the matrices) unless the factor would underflow it
    scaled = y * factor.to(y.dtype) if factor.min() >= torch.finfo(y.dtype).tiny else y * factor
    y = scaled.to(dtype)
    out = None if y.ndim == 2 else torch.empty_like(y)
    for i, matrix in enumerate(y.reshape(-1, *y.shape[-2:])):
        m = matrix.size(0)
        gram, poly = matrix.new_empty(m, m), matrix.new_empty(m, m)
        for a, b, c in triples:
            torch.mm(matrix, matrix.T, out=gram)
            torch.addmm(gram, gram, gram, beta=b, alpha=c, out=poly)     # B = b·A + c·A²
            matrix = torch.addmm(matrix, poly, matrix, beta=a, alpha=1.0)  # X ← a·X + B·X
        if out is None:  # a single matrix: no copy into a batch
            return matrix if wide else matrix.mT
        out.reshape(-1, *y.shape[-2:])[i] = matrix
    return out if wide else out.mT
