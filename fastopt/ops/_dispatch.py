"""Runs one op on a backend: the reference (torch), the C++ op (cpu, cuda) or the Triton op; ``triton_op`` registers
the Triton ones."""

from __future__ import annotations

from typing import Callable

import torch

_LIBRARY = torch.library.Library("fastopt", "FRAGMENT")


def triton_op(name: str, mutates_args: tuple) -> Callable:
    """Decorator: a Triton launcher, annotated as for ``torch.library.custom_op``, registered as the op
    ``fastopt::<name>`` with CUDA and CPU (Triton interpreter) kernels and a no-op fake, as the C++ ops are: opaque
    to torch.compile, called through the dispatcher. Not ``custom_op``, whose wrapper bumps the version counter of
    each mutated tensor in Python: 170 of its 261 µs per call on a 148-tensor AdamW bucket (the launcher stubbed, on
    the CPU; this registration: 105 µs). The C++ ops, like torch's fused optimizers, bump none. Returns the op."""
    def register(fn: Callable):
        _LIBRARY.define(name + torch.library.infer_schema(fn, mutates_args=mutates_args))
        for key in ("CUDA", "CPU"):
            _LIBRARY.impl(name, fn, key)
        torch.library.register_fake(f"fastopt::{name}", lambda *args: None, lib=_LIBRARY)
        return getattr(torch.ops.fastopt, name).default
    return register


def dispatch(backend: str, reference: Callable, native_name: str, triton_op: Callable, args: tuple) -> None:
    if backend == "torch":
        reference(*args)
    elif backend in ("cpu", "cuda"):
        getattr(torch.ops.fastopt, native_name)(*args)
    elif backend == "triton":
        triton_op(*args)
    else:
        raise ValueError(f"unknown backend {backend!r}")
