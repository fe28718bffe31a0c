"""Kernel-level ops, one function per op, each dispatching to its backends."""

from .adam import adam_step, register_native_fake

__all__ = ["adam_step", "register_native_fake"]
