"""What ``python -m fastopt info`` reports: versions, devices, backends and the extensions."""

from __future__ import annotations

import platform

import torch

from . import __version__, backends


def _cuda_extension() -> str:
    from . import _build

    if torch.cuda.is_available():
        return backends.probe("cuda").reason
    return _build.cuda_build_status() + " (not loaded: no CUDA device)"


def collect() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    devices = ["cpu"]
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        devices.append(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    return {
        "fastopt": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda,
        "triton": triton_version,
        "devices": devices,
        "backends": {b: {"available": backends.probe(b).available, "reason": backends.probe(b).reason}
                     for b in backends.BACKENDS if b != "auto"},
        "cuda extension": _cuda_extension(),
    }


def format_info(info: dict) -> str:
    lines = [f"{k:16} {v}" for k, v in info.items() if k not in ("backends", "devices")]
    lines.append("devices          " + "; ".join(info["devices"]))
    lines.append("backends")
    for name, b in info["backends"].items():
        lines.append(f"  {name:8} {'yes' if b['available'] else 'no ':3}  {b['reason']}")
    return "\n".join(lines)
