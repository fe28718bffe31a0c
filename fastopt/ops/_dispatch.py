"""Runs one op on a backend: the reference (torch), the C++ op (cpu, cuda) or the Triton custom op."""

from __future__ import annotations

from typing import Callable

import torch


def dispatch(backend: str, reference: Callable, native_name: str, triton_op: Callable, args: tuple) -> None:
    if backend == "torch":
        reference(*args)
    elif backend in ("cpu", "cuda"):
        getattr(torch.ops.fastopt, native_name)(*args)
    elif backend == "triton":
        triton_op(*args)
    else:
        raise ValueError(f"unknown backend {backend!r}")
