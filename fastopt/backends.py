"""Which kernel backend can run here, why not, and which one a bucket of tensors gets.

Backends: ``cuda`` (csrc/cuda, CUDA tensors), ``triton`` (triton_kernels, CUDA tensors, or
CPU tensors under ``TRITON_INTERPRET=1``), ``cpu`` (csrc/cpu, CPU tensors) and ``torch``
(fastopt.reference: any device, any float dtype). ``auto`` picks per bucket: CUDA tensors → the
optimizer's GPU engine order (``cuda`` then ``triton``; Muon and ROOT: ``triton`` then ``cuda``), else torch;
CPU tensors → cpu, else torch; a fallback to torch warns once. On an H200 the CUDA C++ element-wise engine ran
every element-wise optimizer's step table faster than the Triton one (AdamW 1.2-1.7x; README "On a GPU"), and
SOAP's and Scion's; Muon's and ROOT's, mostly Newton-Schulz, were faster on triton when last measured.
float64 parameters always take the torch backend: every kernel computes in float32.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Probe:
    available: bool
    reason: str


def default_backend() -> str:
    return os.environ.get("FASTOPT_BACKEND", "auto")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def probe(backend: str) -> Probe:
    """Whether ``backend`` can run in this process, with a human-readable reason."""
    from . import _build

    if backend == "torch":
        return Probe(True, "plain torch reference (fastopt.reference)")
    if backend == "cpu":
        try:
            how = _build.build_cpu()
        except Exception as e:  # a failed build must never break import fastopt
            return Probe(False, f"C++ extension failed to build: {type(e).__name__}: {e}")
        from .ops import register_native_fake

        register_native_fake()
        return Probe(True, f"C++ extension ({how})")
    if backend == "triton":
        try:
            import triton
        except ImportError as e:
            return Probe(False, f"triton is not installed ({e})")
        if torch.cuda.is_available():
            return Probe(True, f"triton {triton.__version__} on CUDA")
        if triton_interpreting():
            return Probe(True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1), CPU tensors")
        return Probe(False, "no CUDA device (TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors)")
    if backend == "cuda":
        if not torch.cuda.is_available():
            return Probe(False, "no CUDA device")
        if not probe("cpu").available:  # the CPU extension holds the op schemas
            return Probe(False, f"needs the CPU extension: {probe('cpu').reason}")
        try:
            return Probe(True, f"CUDA extension ({_build.build_cuda()})")
        except Exception as e:
            return Probe(False, f"CUDA extension failed to build: {type(e).__name__}: {e}")
    raise ValueError(f"unknown backend {backend!r}")


def require(backend: str) -> None:
    """Raise with the probe's reason if an explicitly requested backend cannot run here."""
    if backend != "auto" and not probe(backend).available:
        raise RuntimeError(f"fastopt backend {backend!r} is not available: {probe(backend).reason}")


def runs_on(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` can update parameters on ``device`` (given that it is available)."""
    if backend == "torch":
        return True
    if backend == "cpu":
        return device.type == "cpu"
    if backend == "triton":
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreting())
    return device.type == "cuda"


@functools.cache
def _warn_fallback(device_type: str, reason: str) -> None:
    warnings.warn(f"fastopt: no fused kernel for {device_type} tensors ({reason}); using the torch backend",
                  RuntimeWarning, stacklevel=4)


def select(requested: str, device: torch.device, dtype: torch.dtype, gpu_order=("cuda", "triton")) -> str:
    """The backend that runs a bucket of ``dtype`` parameters on ``device``; ``auto`` tries ``gpu_order`` on CUDA
    tensors."""
    if dtype not in KERNEL_DTYPES:
        if requested not in ("auto", "torch"):
            raise TypeError(f"backend {requested!r} supports float32, bfloat16 and float16 parameters, "
                            f"got {dtype}; use backend='torch' or 'auto'")
        return "torch"
    if requested != "auto":
        if not runs_on(requested, device):
            raise RuntimeError(f"backend {requested!r} cannot update parameters on device {device}")
        return requested
    candidates = {"cuda": tuple(gpu_order), "cpu": ("cpu",)}.get(device.type, ())
    for backend in candidates:
        if probe(backend).available:
            return backend
    reasons = "; ".join(f"{b}: {probe(b).reason}" for b in candidates) or "unsupported device type"
    _warn_fallback(device.type, reasons)
    return "torch"
