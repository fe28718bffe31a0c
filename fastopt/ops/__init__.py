"""Kernel-level ops, one function per op, each dispatching to its backends."""

import torch

from .adam import adam_step
from .adam_mini import adam_mini_step
from .kron_factor import kron_factor_update
from .lion import lion_step
from .mars import mars_step
from .newton_schulz import newton_schulz
from .quantile_clamp import clamp_to_quantile
from .sophia import sophia_step

NATIVE_OPS = ("adam_step_", "lion_step_", "mars_step_", "sophia_step_", "adam_mini_step_")  # cpu and cuda kernels
CUDA_OPS = ("symmetric_product_", "quantile_clamp_")  # cuda kernels only (the cpu backend is Python on torch ops)
# cpu kernels only
CPU_OPS = ("advance_steps_", "mirror_upper_", "momentum_direction_", "decayed_update_", "philox_normal_")


def register_native_fake() -> None:
    """The C++ ops exist once the extension is loaded (fastopt.backends calls this then)."""
    for name in NATIVE_OPS + CUDA_OPS + CPU_OPS:
        torch.library.register_fake(f"fastopt::{name}", lambda *args: None)


__all__ = ["adam_step", "adam_mini_step", "clamp_to_quantile", "kron_factor_update", "lion_step", "mars_step",
           "newton_schulz", "sophia_step", "register_native_fake", "NATIVE_OPS", "CUDA_OPS", "CPU_OPS"]
