"""Muon on the Newton-Schulz engine (fastopt.ops.newton_schulz), with a fused AdamW
(fastopt.ops.adam_step) for the parameters that are not hidden matrices."""

from __future__ import annotations

import math

import torch

from ..ops import adam_step, newton_schulz
from ..ops.newton_schulz import PRECISIONS as PRECISION_DTYPES
from ..reference.moments import load, store
from ..state import DEFAULT_BLOCK_SIZE
from .base import FusedOptimizer, check_betas, check_float, split_lr

ADJUST_LR = ("original", "match_rms_adamw")


class Muon(FusedOptimizer):
    r"""Muon (Keller Jordan et al. 2024), a drop-in for ``torch.optim.Muon``: for a matrix
    parameter (conv weights flattened to (out, in·k·k)) with gradient :math:`g`,

    .. math::
        B \leftarrow \mu B + (1-\mu) g, \quad M = (1-\mu) g + \mu B \text{ (nesterov) or } B, \\
        p \leftarrow p(1 - \eta\lambda) - \eta\, s \cdot \mathrm{NS}(M)

    with NS the Newton-Schulz orthogonalisation and :math:`s = \sqrt{\max(1, rows/cols)}`
    (``adjust_lr_fn=None`` or ``"original"``, KellerJordan/Muon) or :math:`0.2\sqrt{\max(rows,
    cols)}` (``"match_rms_adamw"``, Moonlight). The EMA and the sum form :math:`B \leftarrow \mu B
    + g` give the same direction (NS normalises away the factor :math:`1-\mu`).

    Parameters that are not matrices (0-/1-D), and any group with ``use_muon=False`` (embeddings
    and output layers: give them their own group), take AdamW with ``adamw_betas``, ``adamw_eps``,
    the group's ``lr`` and ``weight_decay``. fastopt keywords: ``coefficients`` (a schedule of
    fastopt.ops.newton_schulz, overriding ``ns_coefficients``), ``ns_precision`` ("bf16" or
    "fp32"), ``backend``, ``state_dtype`` (the momentum buffer and AdamW's moments),
    ``block_size``. The momentum update and the parameter update run as torch ops; the
    Newton-Schulz iterations on the engine, stacked by shape.
    """

    MOMENTS = ("momentum_buffer",)  # torch.optim.Muon's state key
    SECOND_MOMENTS = frozenset({"exp_avg_sq"})

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5, adjust_lr_fn=None, *,
                 coefficients=None, ns_precision="bf16", adamw_betas=(0.9, 0.95), adamw_eps=1e-8, backend=None,
                 state_dtype="fp32", block_size=DEFAULT_BLOCK_SIZE):
        check_float("lr", lr)
        check_float("weight_decay", weight_decay)
        check_float("momentum", momentum, 0.0, 1.0, high_open=True)
        check_float("eps", eps)
        check_betas(adamw_betas)
        if adjust_lr_fn is not None and adjust_lr_fn not in ADJUST_LR:
            raise ValueError(f"adjust_lr_fn must be None or one of {ADJUST_LR}, got {adjust_lr_fn!r}")
        if ns_precision not in ("bf16", "fp32"):
            raise ValueError(f"ns_precision must be 'bf16' or 'fp32', got {ns_precision!r}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=bool(nesterov),
                        coefficients=coefficients if coefficients is not None else [tuple(ns_coefficients)],
                        eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn, ns_precision=ns_precision,
                        adamw_betas=adamw_betas, adamw_eps=adamw_eps, use_muon=True)
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype, block_size=block_size)
        if self.backend in ("cuda", "triton"):
            raise NotImplementedError(f"Muon has no {self.backend} Newton-Schulz kernel yet (fastopt issue 4); "
                                      "backend='torch' runs it with plain matmuls on any device")

    @staticmethod
    def _takes_muon(group, p) -> bool:
        return group["use_muon"] and p.ndim >= 2

    def _moment_names(self, group, p) -> list[str]:
        return list(self.MOMENTS) if self._takes_muon(group, p) else ["exp_avg", "exp_avg_sq"]

    def _update(self, backend, group, bucket, grad_scale, found_inf) -> None:
        matrices, others = bucket.split(lambda p: self._takes_muon(group, p))
        if others.params:
            get = others.gather
            lr_tensor, lr = split_lr(group["lr"], bucket.params[0].device)
            beta1, beta2 = (float(b) for b in group["adamw_betas"])
            adam_step(backend, others.params, others.grads, get("exp_avg"), get("exp_avg_sq"), [],
                      get("exp_avg_scale"), get("exp_avg_sq_scale"), [], [], [s["step"] for s in others.states],
                      lr_tensor, lr, beta1, beta2, float(group["adamw_eps"]), float(group["weight_decay"]), False,
                      False, False, self.block_size, -1, grad_scale, found_inf)
        if matrices.params:
            self._muon_update(backend, group, matrices, grad_scale, found_inf)

    def _muon_update(self, backend, group, bucket, grad_scale, found_inf) -> None:
        mu, lr, wd = float(group["momentum"]), group["lr"], float(group["weight_decay"])
        directions = []
        for p, g, state in zip(bucket.params, bucket.grads, bucket.states):
            dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            g = g.to(dtype) if grad_scale is None else g.to(dtype) / grad_scale.to(dtype)
            stored, scale = state["momentum_buffer"], state.get("momentum_buffer_scale")
            if stored.dtype == dtype and found_inf is None:
                new_buf = stored.lerp_(g, 1 - mu)
            else:
                buf = load(stored, scale, self.block_size, dtype)
                new_buf = buf.lerp(g, 1 - mu)
                if found_inf is not None:  # a skipped step keeps the buffer, decided on the device
                    new_buf = torch.where(found_inf.to(torch.bool), buf, new_buf)
                store(stored, scale, new_buf, self.block_size)
            m = g.lerp(new_buf, mu) if group["nesterov"] else new_buf
            directions.append(m.reshape(m.shape[0], -1))
        precision = group["ns_precision"] if directions[0].dtype != torch.float64 else "fp64"
        ns = dict(steps=group["ns_steps"], coefficients=group["coefficients"], eps=float(group["eps"]),
                  backend="torch" if backend == "torch" else "auto", precision=precision,
                  out_dtype=PRECISION_DTYPES[precision])
        if backend == "cpu":  # the CPU engine runs one matrix at a time: stacking would only copy
            orthogonal = [newton_schulz(d, **ns) for d in directions]
        else:  # one batch per shape
            orthogonal = [None] * len(directions)
            by_shape = {}
            for i, d in enumerate(directions):
                by_shape.setdefault(tuple(d.shape), []).append(i)
            for members in by_shape.values():
                for i, o in zip(members, newton_schulz(torch.stack([directions[i] for i in members]), **ns)):
                    orthogonal[i] = o
        for p, d, o in zip(bucket.params, directions, orthogonal):
            step = lr * _lr_scale(group["adjust_lr_fn"], d.shape)
            if found_inf is not None:  # a skipped step changes nothing, decided on the device
                keep = 1 - found_inf.to(p.dtype)
                p.mul_(1 - (lr * wd) * keep).sub_(o.reshape(p.shape) * (step * keep))
            elif isinstance(step, torch.Tensor):
                p.mul_(1 - lr * wd).sub_(o.reshape(p.shape) * step)
            else:
                p.mul_(1 - lr * wd).add_(o.reshape(p.shape), alpha=-step)


def _lr_scale(adjust_lr_fn, shape) -> float:
    rows, cols = shape
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))
