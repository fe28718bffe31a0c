"""SOAP: Adam in the eigenbasis of Shampoo's Kronecker factors, the factors on fastopt.ops.kron_factor_update."""

from __future__ import annotations

import torch

from ..ops import kron_factor_update
from ..reference.soap import soap_step, update_factors
from ..state import DEFAULT_BLOCK_SIZE
from .base import FusedOptimizer, check_betas, check_float
from .muon import unscaled


class SOAP(FusedOptimizer):
    r"""SOAP (Vyas et al. 2024, nikhilvyas/SOAP), with the official constructor's names and defaults. Per
    tensor, with factors :math:`L = \mathrm{EMA}(GG^\top)`, :math:`R = \mathrm{EMA}(G^\top G)` (one per
    dimension up to ``max_precond_dim``; vectors only with ``precondition_1d``) and their eigenbases
    :math:`Q_L, Q_R`:

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) G, \quad v \leftarrow \beta_2 v + (1-\beta_2)(Q_L^\top G Q_R)^2, \\
        p \leftarrow p - \eta \tfrac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,
                     Q_L \frac{Q_L^\top m Q_R}{\sqrt{v} + \epsilon} Q_R^\top, \quad p \leftarrow p(1 - \eta\lambda)

    The first step only builds the factors and the bases (``eigh``); every ``precondition_frequency``
    steps the bases are refreshed by one power iteration and QR, re-sorted, with v permuted to match.
    The math is fastopt.reference.soap (the ``torch`` backend runs it as it is); on the ``cpu`` and
    ``triton`` backends the factor EMA of a matrix runs on fastopt.ops.kron_factor_update (one triangle,
    the EMA fused). The moments and factors stay fp32 (``state_dtype`` other than "fp32" is refused:
    the refresh permutes v, which block-scaled fp8 cannot follow yet); ``merge_dims`` is not supported yet.
    A dimension above ``max_precond_dim`` gets no factor: a (50257, 768) embedding keeps one 768×768
    factor, never a 50257² one.
    """

    MOMENTS = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr=3e-3, betas=(0.95, 0.95), shampoo_beta=None, eps=1e-8, weight_decay=0.01,
                 precondition_frequency=10, max_precond_dim=10000, merge_dims=False, precondition_1d=False,
                 normalize_grads=False, correct_bias=True, *, backend=None, state_dtype="fp32",
                 block_size=DEFAULT_BLOCK_SIZE):
        check_float("lr", lr)
        check_betas(betas)
        if shampoo_beta is not None:
            check_float("shampoo_beta", shampoo_beta, 0.0, 1.0, high_open=True)
        check_float("eps", eps)
        check_float("weight_decay", weight_decay)
        for name, value in (("precondition_frequency", precondition_frequency), ("max_precond_dim", max_precond_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if merge_dims:
            raise NotImplementedError("SOAP(merge_dims=True) is not supported yet (fastopt issue 5): tensors of 3+ "
                                      "dimensions get one factor per dimension")
        if state_dtype != "fp32":
            raise NotImplementedError(f"SOAP keeps its moments in fp32 for now (fastopt issue 5), got state_dtype "
                                      f"{state_dtype!r}")
        defaults = dict(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
                        precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
                        precondition_1d=bool(precondition_1d), normalize_grads=bool(normalize_grads),
                        correct_bias=bool(correct_bias))
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype, block_size=block_size)

    def _update(self, backend, group, bucket, grad_scale, found_inf) -> None:
        if found_inf is not None:
            raise NotImplementedError("SOAP does not support torch.amp.GradScaler yet (fastopt issue 5)")
        options = {k: group[k] for k in ("lr", "betas", "shampoo_beta", "eps", "weight_decay", "precondition_frequency",
                                         "max_precond_dim", "precondition_1d", "normalize_grads", "correct_bias")}
        options["lr"] = float(options["lr"])
        factor_update = update_factors if backend == "torch" else _factor_kernel(backend)
        for p, g, state in zip(bucket.params, bucket.grads, bucket.states):
            g = unscaled(g, grad_scale)
            # the call's number decides the refresh on the host (one read of the device counter per tensor)
            soap_step(p, g, state, int(state["step"]), factor_update=factor_update, **options)

    def _convert_state(self, p, group, saved: dict) -> dict:
        state = super()._convert_state(p, group, saved)
        for key in ("GG", "Q"):
            if key in saved:
                state[key] = [None if t is None else t.to(device=p.device, dtype=torch.float32, copy=True)
                              for t in saved[key]]
        return state


def _factor_kernel(backend: str):
    """The factor EMA on fastopt.ops.kron_factor_update for matrices, the reference contraction otherwise."""
    def update(grad, factors, shampoo_beta):
        if grad.ndim == 2:
            kron_factor_update(factors[0], factors[1], grad, shampoo_beta, backend="auto" if backend == "cuda"
                               else backend)
        else:
            update_factors(grad, factors, shampoo_beta)
    return update
