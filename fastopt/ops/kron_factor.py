"""The Kronecker-factor update of SOAP and Kron: ``kron_factor_update(L, R, G, beta, backend="auto")``.

For a gradient G (m, n), or each matrix of a (B, m, n) batch, in place on fp32 factors:

    L ← β·L + (1−β)·G·Gᵀ   (m, m)        R ← β·R + (1−β)·Gᵀ·G   (n, n)

Either factor may be None (a dimension left unpreconditioned). Both products are symmetric: the
kernels compute one triangle and mirror it, with the EMA fused (the old factor is the bias of the
product). Backends: ``torch`` (the reference, any device, fp64-capable), ``cpu`` (one matrix at a
time, fastopt.ops.symmetric's block-triangle products), ``triton`` (the Newton-Schulz engine's
symmetric-product kernel, fastopt.triton_kernels.newton_schulz, with the factor as its bias: one
launch per factor for the whole batch; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``),
``cuda`` (fastopt::symmetric_product_, csrc/cuda/symmetric_product.cu: cuBLAS SSYRK per matrix with the EMA as
its beta term, then one batched launch mirroring the triangle; float32, CUDA tensors), ``auto`` (CPU → cpu,
CUDA → triton, float64 → torch; without the kernel of the device, torch with a warning).
"""

from __future__ import annotations

import warnings

import torch

from ..backends import probe, triton_interpreting
from .symmetric import symmetric_mm

KF_BACKENDS = ("auto", "cpu", "torch", "triton", "cuda")


@torch.no_grad()
def kron_factor_update(left, right, grad: torch.Tensor, beta: float, backend: str = "auto") -> None:
    """The update of the module docstring, in place on ``left`` and ``right`` (either may be None)."""
    _check(left, right, grad, beta)
    backend = _resolve(backend, grad.device, left if left is not None else right)
    g = grad.to(left.dtype if left is not None else right.dtype)
    for factor, transpose in ((left, False), (right, True)):  # L from G·Gᵀ, R from Gᵀ·G
        if factor is None:
            continue
        operand = g.mT if transpose else g
        if backend == "torch":
            factor.mul_(beta).add_(operand @ operand.mT, alpha=1 - beta)
        elif backend == "triton":
            from ..triton_kernels.newton_schulz import symmetric_product

            batched = operand if operand.ndim == 3 else operand[None]
            out = factor if factor.ndim == 3 else factor[None]
            symmetric_product(batched, out, 1 - beta, bias=out, beta=beta)
        elif backend == "cuda":  # the kernel reads G itself, transposed in place of a copy
            batched = g if g.ndim == 3 else g[None]
            out = factor if factor.ndim == 3 else factor[None]
            torch.ops.fastopt.symmetric_product_(out, batched.contiguous(), 1 - beta, beta, transpose)
        else:
            for f, a in zip(factor.reshape(-1, *factor.shape[-2:]), operand.reshape(-1, *operand.shape[-2:])):
                symmetric_mm(a, a.mT, bias=f, beta=beta, alpha=1 - beta, out=f)


def _check(left, right, grad, beta) -> None:
    if not isinstance(grad, torch.Tensor) or grad.ndim not in (2, 3) or not grad.is_floating_point() \
            or grad.layout != torch.strided:
        raise ValueError("kron_factor_update takes a dense real floating-point (m, n) or (B, m, n) gradient, got "
                         f"{type(grad).__name__} {getattr(grad, 'dtype', '')} {tuple(getattr(grad, 'shape', ()))}")
    if left is None and right is None:
        raise ValueError("kron_factor_update: both factors are None, nothing to update")
    batch, (m, n) = grad.shape[:-2], grad.shape[-2:]
    for name, factor, size in (("L", left, m), ("R", right, n)):
        if factor is None:
            continue
        if tuple(factor.shape) != (*batch, size, size):
            raise ValueError(f"kron_factor_update: {name} has shape {tuple(factor.shape)}, expected "
                             f"{(*batch, size, size)} for a gradient of shape {tuple(grad.shape)}")
        if factor.dtype not in (torch.float32, torch.float64) or factor.device != grad.device:
            raise ValueError(f"kron_factor_update: {name} must be float32 (or float64) on {grad.device}, got "
                             f"{factor.dtype} on {factor.device}")
        if not factor.is_contiguous():
            raise ValueError(f"kron_factor_update: {name} must be contiguous (it is updated in place)")
    if left is not None and right is not None and left.dtype != right.dtype:
        raise ValueError(f"kron_factor_update: L and R must share a dtype, got {left.dtype} and {right.dtype}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
        raise ValueError(f"kron_factor_update: beta must be a number in [0, 1], got {beta!r}")


def _resolve(backend: str, device: torch.device, factor: torch.Tensor) -> str:
    if backend not in KF_BACKENDS:
        raise ValueError(f"backend must be one of {KF_BACKENDS}, got {backend!r}")
    if backend == "cuda":
        if device.type != "cuda" or factor.dtype != torch.float32:
            raise ValueError(f"kron_factor_update backend 'cuda' updates float32 factors on CUDA tensors, got "
                             f"{factor.dtype} on {device}")
        if not probe("cuda").available:
            raise RuntimeError(f"kron_factor_update backend 'cuda' is not available: {probe('cuda').reason}")
    if backend == "auto":
        if factor.dtype == torch.float64:
            return "torch"
        if device.type == "cpu" and probe("cpu").available:
            return "cpu"
        if device.type == "cuda" and probe("triton").available:
            return "triton"
        warnings.warn(f"fastopt: kron_factor_update has no kernel for {device.type} tensors here; running the "
                      "torch reference (plain matmuls)", stacklevel=3)
        return "torch"
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"kron_factor_update backend 'cpu' needs CPU tensors, got {device}")
        if not probe("cpu").available:  # the symmetric products' mirror is a kernel of the CPU extension
            raise RuntimeError(f"kron_factor_update backend 'cpu' is not available: {probe('cpu').reason}")
    if backend == "triton":
        if factor.dtype != torch.float32:
            raise ValueError("kron_factor_update backend 'triton' updates float32 factors; float64 runs on 'torch'")
        if device.type == "cpu" and not triton_interpreting():
            raise ValueError("kron_factor_update backend 'triton' needs CUDA tensors, or CPU tensors under "
                             "TRITON_INTERPRET=1")
    return backend
