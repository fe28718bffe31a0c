"""ROOT: Muon with outlier-clipped momentum and per-shape Newton-Schulz coefficients."""

from __future__ import annotations

import math

import torch

from ..ops import clamp_to_quantile
from ..ops.newton_schulz import PRECISIONS as NS_DTYPES
from ..reference.update import compute_dtype
from ..state import DEFAULT_BLOCK_SIZE
from .base import FusedOptimizer, check_float
from .muon import Muon, matrix_defaults, ns_options, orthogonalise

THRESHOLD_OFFSET = 1e-9  # the official code's ε = quantile + 1e-9


class ROOT(Muon):
    r"""ROOT (He et al. 2025, "ROOT: Robust Orthogonalized Optimizer for Neural Network Training",
    huawei-noah/noah-research ``ROOT/``), computing as the official code does: for a matrix parameter
    (conv weights flattened) with gradient :math:`g`,

    .. math::
        B \leftarrow \mu B + g, \quad M = g + \mu B \text{ (nesterov) or } B, \\
        \varepsilon = \mathrm{quantile}(|M|, q) + 10^{-9}, \quad
        M_\varepsilon = M - \mathrm{sign}(M)\max(|M| - \varepsilon, 0)
                      = \mathrm{clamp}(M, -\varepsilon, \varepsilon), \\
        p \leftarrow p(1 - \eta\lambda) - 0.2\sqrt{\max(m, n)}\, \eta\, \mathrm{NS}(M_\varepsilon)

    with the quantile linear between order statistics (``torch.quantile``'s default), computed exactly
    by fastopt.ops.clamp_to_quantile, and NS the Newton-Schulz engine with ROOT's per-shape
    coefficients (``coefficients="root"``; any schedule of fastopt.ops.newton_schulz may be given).
    ``ns_dtype``: "bf16" (default, fast) or "fp32" (the official code's precision). The buffer is the
    plain sum (not Muon's EMA), state key ``momentum_buffer``.

    Parameters that are not matrices, and groups with ``use_root=False`` (embeddings and output
    layers; fastopt.create_optimizer sets it), take AdamW with ``adamw_betas``, ``adamw_eps``, the
    group's ``lr`` and ``weight_decay`` (fastopt's AdamW adds ε to the bias-corrected √v̂; the
    official code's backup AdamW adds it to √v, a difference only while ε is not small next to √v).
    """

    MATRIX_KEY = "use_root"
    ROLE_OPTIONS = {"embedding": {"use_root": False}, "output": {"use_root": False},
                    "vector": {"use_root": False, "weight_decay": 0.0}}

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=5, ns_dtype="bf16",
                 quantile=0.9, *, coefficients="root", eps=1e-7, adamw_betas=(0.9, 0.95), adamw_eps=1e-8,
                 backend=None, state_dtype="fp32", block_size=DEFAULT_BLOCK_SIZE):
        check_float("quantile", quantile, 0.0, 1.0)
        if ns_dtype not in ("bf16", "fp32"):
            raise ValueError(f"ns_dtype must be 'bf16' or 'fp32', got {ns_dtype!r}")
        defaults = matrix_defaults(lr, weight_decay, momentum, nesterov, eps, ns_steps, coefficients, ns_dtype,
                                   adamw_betas, adamw_eps)
        FusedOptimizer.__init__(self, params, defaults | {"quantile": quantile, "use_root": True}, backend=backend,
                                state_dtype=state_dtype, block_size=block_size)

    @staticmethod
    def _accumulate_(group, bufs, grads) -> None:
        """B ← μB + g in place on each buffer (the official code's sum)."""
        torch._foreach_mul_(bufs, float(group["momentum"]))
        torch._foreach_add_(bufs, grads)

    @staticmethod
    def _direction(group, grads, bufs) -> list:
        """M = g + μB with Nesterov, else B, for each pair."""
        return torch._foreach_add(grads, bufs, alpha=float(group["momentum"])) if group["nesterov"] else bufs

    @staticmethod
    def _momentum_coefficients(group) -> tuple:
        mu = float(group["momentum"])
        return (mu, 1.0, 1.0, mu) if group["nesterov"] else (mu, 1.0, 0.0, 1.0)

    @staticmethod
    def _direction_dtype(group, g) -> torch.dtype:
        """M in the compute dtype: the quantile clamp reads it (and writes NS's operand with its norm)."""
        return compute_dtype(g)

    def _orthogonalise(self, backend, group, directions, norms) -> list:
        options = ns_options(backend, group, directions[0].dtype) | {"eps": float(group["eps"])}
        # under backend="auto" the selection takes its own auto: on CUDA the CUDA select, else a sort, both measured
        # faster than the Triton select the bucket's triton backend would give (README "On a GPU")
        select = "auto" if self.backend == "auto" else backend

        def clipped(x):  # one matrix, or a stack of same-shape ones: one selection per matrix; the clamp pass
            # writes NS's operand dtype and the norm NS divides by
            clamped, _, norm = clamp_to_quantile(x, group["quantile"], THRESHOLD_OFFSET, backend=select,
                                                 out_dtype=NS_DTYPES[options["precision"]], with_norm=True)
            return clamped, norm

        return orthogonalise(directions, options, backend, prepare=clipped)

    @staticmethod
    def _lr_scale(group, shape) -> float:
        return 0.2 * math.sqrt(max(shape))
