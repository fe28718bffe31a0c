"""Scion: a norm's linear minimisation oracle per param group, spectral ones on the Newton-Schulz engine."""

from __future__ import annotations

import math
from functools import partial

import torch

from ..ops.newton_schulz import PRECISIONS as PRECISION_DTYPES
from ..reference.update import compute_dtype
from ..state import DEFAULT_BLOCK_SIZE
from .base import FusedOptimizer, check_float
from .muon import decay_and_step_, momentum_pass, ns_options, on_matrices, orthogonalise
from .sharding import own_shards, per_owner, whole

NORM_KWARGS = {"auto": (), "spectral": ("max", "normalized"), "spectral_conv": (), "sign": ("normalized",),
               "colnorm": ("normalized", "transpose"), "rownorm": ("normalized", "transpose"), "bias_rms": ()}
LMO_EPS = 1e-8  # the official code's guard against a zero norm


class Scion(FusedOptimizer):
    r"""Scion (Pethick et al. 2025, "Training Deep Learning Models with Norm-Constrained LMOs",
    LIONS-EPFL/scion). Per parameter, with the group's ``lr`` η, ``scale`` ρ (the radius of the norm
    ball) and ``momentum`` α:

    .. math::
        B \leftarrow (1-\alpha) B + \alpha g, \quad
        p \leftarrow (1-\eta) p \text{ (unless unconstrained)}, \quad
        p \leftarrow p - \eta \rho\, \mathrm{lmo}(B)

    ``momentum`` follows the official code: it is the weight of the *new* gradient, one minus the usual
    β (0.1 means β = 0.9; 1 means no averaging). ``beta=`` takes the usual β instead (the constructor,
    or a param group's ``"beta"``); giving both is an error. ``unconstrained=False`` is Scion's
    constrained variant (the decay (1-η)p keeps the iterates in the ball of radius ρ), ``True`` the
    unconstrained one. The LMO of each ``norm`` (``norm_kwargs`` as in the official code), for a matrix
    of d_out rows and d_in columns:

    * ``"spectral"``: NS(B)·√(d_out/d_in) (``normalized=True``, default) or NS(B)·√d_out; ``max=True``
      takes max(1, that factor). NS: fastopt.ops.newton_schulz, ``ns_steps`` (10) steps of
      ``coefficients`` ("muon") in ``ns_precision`` ("bf16");
    * ``"spectral_conv"``: NS of the (out, in·k…) flattening, times √(out/in)/k^(ndim−2);
    * ``"sign"``: sign(B)/d_in (``normalized=True``, default) or sign(B);
    * ``"colnorm"``: each column divided by its RMS (times d_in with ``normalized=True``; default
      False); ``transpose=True`` for ``nn.Embedding``'s (vocab, dim) layout (one column per token);
    * ``"rownorm"``: each row divided by its norm (times √d_in with ``normalized=True``, default);
    * ``"bias_rms"``: B divided by its RMS (along dim 0), for vectors;
    * ``"auto"`` (default): spectral_conv for conv weights, spectral for matrices, bias_rms for vectors.

    The divisions add 1e-8 to the norm, as the official code does. The momentum buffer is always kept
    (in ``state_dtype``), also with ``momentum=1``. The default momentum 0.1 is the official README's
    advice (the official code's default is 1, no averaging); ``ns_steps`` 10 is the paper's.
    """

    MOMENTS = ("momentum_buffer",)
    ROLE_OPTIONS = {"hidden": {"norm": "auto"}, "output": {"norm": "sign"},
                    "embedding": {"norm": "colnorm", "norm_kwargs": {"transpose": True}},
                    "vector": {"norm": "bias_rms"}}

    def __init__(self, params, lr=1e-3, momentum=None, *, beta=None, norm="auto", norm_kwargs=None, scale=1.0,
                 unconstrained=False, ns_steps=10, coefficients="muon", ns_precision="bf16", backend=None,
                 state_dtype="fp32", block_size=DEFAULT_BLOCK_SIZE):
        check_float("lr", lr)
        check_float("scale", scale)
        if ns_precision not in ("bf16", "fp32"):
            raise ValueError(f"ns_precision must be 'bf16' or 'fp32', got {ns_precision!r}")
        momentum = _momentum_from(momentum, beta, default=0.1)
        defaults = dict(lr=lr, momentum=momentum, norm=norm, norm_kwargs=dict(norm_kwargs or {}), scale=scale,
                        unconstrained=bool(unconstrained), ns_steps=ns_steps, coefficients=coefficients,
                        ns_precision=ns_precision)
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype, block_size=block_size)

    def add_param_group(self, param_group: dict) -> None:
        if "beta" in param_group or "momentum" in param_group:
            param_group = dict(param_group)
            param_group["momentum"] = _momentum_from(param_group.get("momentum"), param_group.pop("beta", None))
        norm = param_group.get("norm", self.defaults["norm"])
        kwargs = param_group.get("norm_kwargs", self.defaults["norm_kwargs"]) or {}
        if norm not in NORM_KWARGS:
            raise ValueError(f"norm must be one of {sorted(NORM_KWARGS)}, got {norm!r}")
        unknown = set(kwargs) - set(NORM_KWARGS[norm])
        if unknown:
            raise ValueError(f"norm {norm!r} takes norm_kwargs {NORM_KWARGS[norm]}, got {sorted(unknown)}")
        super().add_param_group(param_group)

    def steps_local_shards(self, group) -> bool:
        return True  # NS on each matrix's owner rank, the other LMOs all-gathered (fastopt.optim.sharding)

    def _update(self, backend, group, bucket, grad_scale, found_inf) -> None:
        alpha = float(group["momentum"])
        kinds = [_resolve(group["norm"], p) for p in bucket.params]  # before any state changes: it may raise
        spectral = [i for i, k in enumerate(kinds) if k in ("spectral", "spectral_conv")]
        ns = ns_options(backend, group, compute_dtype(bucket.params[0]))
        # on the cpu backend the spectral params' EMA runs in the C++ momentum kernel, which writes M = B in NS's
        # operand dtype with its norm (the other LMOs read the float32 buffer itself)
        kernel_args = ((1 - alpha, alpha, 0.0, 1.0), PRECISION_DTYPES[ns["precision"]])
        directions, norms = momentum_pass(backend, bucket, grad_scale, found_inf, self.block_size,
                                          partial(_ema_, alpha), lambda grads, bufs: bufs,  # M = B
                                          lambda i, g: kernel_args if i in spectral else None)
        sharded = bucket.sharded  # FSDP2: NS on each matrix's owner rank, the other LMOs on all-gathered tensors
        shapes = [tuple(d.shape if s is None else s.shape) for d, s in zip(directions, sharded)]  # whole
        updates, factors = [None] * len(directions), [1.0] * len(directions)
        if spectral:
            orthogonal = on_matrices(lambda flat, flat_norms: orthogonalise(flat, ns, backend, norms=flat_norms))
            outputs = per_owner(orthogonal, [directions[i] for i in spectral], [norms[i] for i in spectral],
                                [sharded[i] for i in spectral], ns["out_dtype"])
            for i, o in zip(spectral, outputs):
                updates[i] = o
                factors[i] = _spectral_factor(kinds[i], shapes[i], group["norm_kwargs"])
        others = [i for i, u in enumerate(updates) if u is None]
        wholes = whole([directions[i] for i in others], [sharded[i] for i in others])
        lmos = [_elementwise_lmo(kinds[i], d, group["norm_kwargs"]) for i, d in zip(others, wholes)]
        for i, u in zip(others, own_shards(lmos, [sharded[i] for i in others])):
            updates[i] = u
        lr, rho = group["lr"], float(group["scale"])
        decay = 0.0 if group["unconstrained"] else 1.0
        decay_and_step_(bucket.params, updates, lr * decay, [lr * rho * factor for factor in factors], found_inf,
                        fused=backend == "cpu")


def _momentum_from(momentum, beta, default=None) -> float:
    """Scion's ``momentum`` (the new gradient's weight) from either spelling."""
    if momentum is not None and beta is not None:
        raise ValueError("give momentum (Scion's convention: the new gradient's weight, 1 - beta) or beta "
                         "(the usual EMA factor), not both")
    if beta is not None:
        check_float("beta", beta, 0.0, 1.0, high_open=True)
        return 1.0 - float(beta)
    momentum = default if momentum is None else momentum
    check_float("momentum", momentum, 0.0, 1.0)
    if momentum == 0:
        raise ValueError("momentum 0 would never take a gradient in (Scion's momentum is the new gradient's "
                         "weight, 1 - beta): did you mean beta=0?")
    return float(momentum)


def _ema_(alpha, bufs, grads) -> None:
    torch._foreach_lerp_(bufs, grads, alpha)


def _resolve(norm: str, p: torch.Tensor) -> str:
    if norm == "auto":
        return "spectral_conv" if p.ndim >= 3 else "spectral" if p.ndim == 2 else "bias_rms"
    if norm in ("spectral", "sign", "colnorm", "rownorm") and p.ndim != 2:
        raise ValueError(f"Scion norm {norm!r} takes matrices, got a parameter of shape {tuple(p.shape)} "
                         "(conv weights: 'spectral_conv' or 'auto'; vectors: 'bias_rms')")
    if norm == "spectral_conv" and p.ndim not in (3, 4):
        raise ValueError(f"Scion norm 'spectral_conv' takes 3-D or 4-D conv weights, got {tuple(p.shape)}")
    return norm


def _spectral_factor(kind: str, shape, kwargs) -> float:
    if kind == "spectral_conv":
        out_channels, in_channels, k = shape[0], shape[1], shape[2]
        return math.sqrt(out_channels / in_channels) / k ** (len(shape) - 2)
    d_out, d_in = shape
    factor = math.sqrt(d_out / d_in) if kwargs.get("normalized", True) else math.sqrt(d_out)
    return max(1.0, factor) if kwargs.get("max", False) else factor


def _elementwise_lmo(kind: str, b: torch.Tensor, kwargs) -> torch.Tensor:
    if kind == "sign":
        return b.sign() / b.shape[1] if kwargs.get("normalized", True) else b.sign()
    if kind == "bias_rms":
        rms = b.square().mean() if b.ndim == 0 else b.square().mean(dim=0, keepdim=True)
        return b / (rms.sqrt() + LMO_EPS)
    m = b.mT if kwargs.get("transpose", False) else b
    if kind == "colnorm":
        rms = m.square().sum(dim=0, keepdim=True).sqrt() / math.sqrt(m.shape[0])
        if kwargs.get("normalized", False):
            rms = rms * m.shape[1]
    else:  # rownorm
        rms = m.square().sum(dim=-1, keepdim=True).sqrt()
        if kwargs.get("normalized", True):
            rms = rms * math.sqrt(m.shape[-1])
    out = m / (rms + LMO_EPS)
    return out.mT if kwargs.get("transpose", False) else out
