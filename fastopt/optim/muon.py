"""Muon on the Newton-Schulz engine (fastopt.ops.newton_schulz), with a fused AdamW
(fastopt.ops.adam_step) for the parameters that are not hidden matrices."""

from __future__ import annotations

import math
from functools import partial

import torch

from ..backends import KERNEL_DTYPES
from ..ops import adam_step, newton_schulz
from ..ops.momentum import momentum_direction_triton_
from ..ops.newton_schulz import PRECISIONS as PRECISION_DTYPES, cpu_batches
from ..reference.moments import load, store
from ..reference.update import compute_dtype
from ..state import DEFAULT_BLOCK_SIZE
from .base import FusedOptimizer, check_betas, check_float, split_lr
from .sharding import per_owner

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
    and output layers; ``fastopt.create_optimizer(model, "muon")`` sets it), take AdamW with
    ``adamw_betas``, ``adamw_eps``, the group's ``lr`` and ``weight_decay``. fastopt keywords:
    ``coefficients`` (a schedule of fastopt.ops.newton_schulz, overriding ``ns_coefficients``),
    ``ns_precision`` ("bf16" or "fp32"), ``backend``, ``state_dtype`` (the momentum buffer and
    AdamW's moments), ``block_size``. On the cpu backend the momentum pass (B, then M in the engine's
    operand dtype with its norm) is one C++ kernel, fastopt::momentum_direction_, for every state dtype, and
    the parameter update another, fastopt::decayed_update_ (where the update is contiguous and lr a float);
    GradScaler steps and the other backends run both as torch ops. The Newton-Schulz iterations run on the
    engine (one matrix at a time on the CPU, one batch per shape on the GPU).
    """

    MOMENTS = ("momentum_buffer",)  # torch.optim.Muon's state key
    SECOND_MOMENTS = frozenset({"exp_avg_sq"})
    MATRIX_KEY = "use_muon"  # the group key that sends a group's matrices to AdamW when False
    GPU_ORDER = ("triton", "cuda")  # Muon's and ROOT's steps ran faster on triton on an H200 (README "On a GPU")
    ROLE_OPTIONS = {"embedding": {"use_muon": False}, "output": {"use_muon": False},
                    "vector": {"use_muon": False, "weight_decay": 0.0}}

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5, adjust_lr_fn=None, *,
                 coefficients=None, ns_precision="bf16", adamw_betas=(0.9, 0.95), adamw_eps=1e-8, backend=None,
                 state_dtype="fp32", block_size=DEFAULT_BLOCK_SIZE):
        if adjust_lr_fn is not None and adjust_lr_fn not in ADJUST_LR:
            raise ValueError(f"adjust_lr_fn must be None or one of {ADJUST_LR}, got {adjust_lr_fn!r}")
        defaults = matrix_defaults(lr, weight_decay, momentum, nesterov, eps, ns_steps,
                                   coefficients if coefficients is not None else [tuple(ns_coefficients)],
                                   ns_precision, adamw_betas, adamw_eps)
        super().__init__(params, defaults | {"adjust_lr_fn": adjust_lr_fn, "use_muon": True}, backend=backend,
                         state_dtype=state_dtype, block_size=block_size)

    def steps_local_shards(self, group) -> bool:
        return True  # Newton-Schulz on each whole matrix on one rank (fastopt.optim.sharding); AdamW on the shards

    def _takes_matrix_rule(self, group, p) -> bool:
        return group[self.MATRIX_KEY] and p.ndim >= 2

    def _moment_names(self, group, p) -> list[str]:
        return list(self.MOMENTS) if self._takes_matrix_rule(group, p) else ["exp_avg", "exp_avg_sq"]

    def _update(self, backend, group, bucket, grad_scale, found_inf) -> None:
        matrices, others = bucket.split(lambda p: self._takes_matrix_rule(group, p))
        if others.params:
            get = others.gather
            lr_tensor, lr = split_lr(group["lr"], bucket.params[0].device)
            beta1, beta2 = (float(b) for b in group["adamw_betas"])
            adam_step(backend, others.params, others.grads, get("exp_avg"), get("exp_avg_sq"), [],
                      get("exp_avg_scale"), get("exp_avg_sq_scale"), [], [], [s["step"] for s in others.states],
                      lr_tensor, lr, beta1, beta2, float(group["adamw_eps"]), float(group["weight_decay"]), False,
                      False, False, self.block_size, -1, grad_scale, found_inf)
        if matrices.params:
            self._matrix_update(backend, group, matrices, grad_scale, found_inf)

    def _matrix_update(self, backend, group, bucket, grad_scale, found_inf) -> None:
        lr, wd = group["lr"], float(group["weight_decay"])
        directions, norms = momentum_pass(
            backend, bucket, grad_scale, found_inf, self.block_size, partial(self._accumulate_, group),
            partial(self._direction, group),
            lambda i, g: (self._momentum_coefficients(group), self._direction_dtype(group, g)))
        shapes = [tuple(d.shape if s is None else s.shape) for d, s in zip(directions, bucket.sharded)]  # whole
        # FSDP2's sharded matrices orthogonalised whole, each on one rank (fastopt.optim.sharding)
        orthogonal = on_matrices(lambda flat, flat_norms: self._orthogonalise(backend, group, flat, flat_norms))
        updates = per_owner(orthogonal, directions, norms, bucket.sharded,
                            ns_options(backend, group, directions[0].dtype)["out_dtype"])
        decay_and_step_(bucket.params, updates, lr * wd,
                        [lr * self._lr_scale(group, (s[0], math.prod(s[1:]))) for s in shapes], found_inf,
                        fused=backend == "cpu")

    # ---- the parts ROOT changes ------------------------------------------------------------

    @staticmethod
    def _accumulate_(group, bufs, grads) -> None:
        """B ← μB + (1−μ)g in place on each buffer (torch.optim.Muon's EMA)."""
        torch._foreach_lerp_(bufs, grads, 1 - float(group["momentum"]))

    @staticmethod
    def _direction(group, grads, bufs) -> list:
        """M = (1−μ)g + μB with Nesterov, else B, for each pair."""
        return torch._foreach_lerp(grads, bufs, float(group["momentum"])) if group["nesterov"] else bufs

    @staticmethod
    def _momentum_coefficients(group) -> tuple:
        """(β, γ, δ, ε) of B ← β·B + γ·g, M = δ·g + ε·B: _accumulate_ and _direction for the CPU kernel."""
        mu = float(group["momentum"])
        return (mu, 1 - mu, 1 - mu, mu) if group["nesterov"] else (mu, 1 - mu, 0.0, 1.0)

    @staticmethod
    def _direction_dtype(group, g) -> torch.dtype:
        """The dtype the CPU kernel writes M in: Newton-Schulz's operand dtype, with M's norm beside it."""
        return PRECISION_DTYPES[group["ns_precision"]]

    def _orthogonalise(self, backend, group, directions, norms) -> list:
        options = ns_options(backend, group, directions[0].dtype) | {"eps": float(group["eps"])}
        return orthogonalise(directions, options, backend, norms=norms)

    @staticmethod
    def _lr_scale(group, shape) -> float:
        rows, cols = shape
        if group["adjust_lr_fn"] == "match_rms_adamw":
            return 0.2 * math.sqrt(max(rows, cols))
        return math.sqrt(max(1.0, rows / cols))


def matrix_defaults(lr, weight_decay, momentum, nesterov, eps, ns_steps, coefficients, ns_precision, adamw_betas,
                    adamw_eps) -> dict:
    """The checked group defaults Muon and ROOT share."""
    check_float("lr", lr)
    check_float("weight_decay", weight_decay)
    check_float("momentum", momentum, 0.0, 1.0, high_open=True)
    check_float("eps", eps)
    check_betas(adamw_betas)
    if ns_precision not in ("bf16", "fp32"):
        raise ValueError(f"ns_precision must be 'bf16' or 'fp32', got {ns_precision!r}")
    return dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=bool(nesterov), eps=eps,
                ns_steps=ns_steps, coefficients=coefficients, ns_precision=ns_precision, adamw_betas=adamw_betas,
                adamw_eps=adamw_eps)


def unscaled(g: torch.Tensor, grad_scale) -> torch.Tensor:
    """g in the compute dtype (float32; float64 for float64), divided by GradScaler's scale where given."""
    dtype = compute_dtype(g)
    return g.to(dtype) if grad_scale is None else g.to(dtype) / grad_scale.to(dtype)


def ns_options(backend: str, group: dict, dtype: torch.dtype) -> dict:
    """fastopt.ops.newton_schulz's keywords for a group's directions of ``dtype`` (float64 runs in fp64)."""
    precision = group["ns_precision"] if dtype != torch.float64 else "fp64"
    return dict(steps=group["ns_steps"], coefficients=group["coefficients"], backend=backend,
                precision=precision, out_dtype=PRECISION_DTYPES[precision])


def decay_and_step_(params, updates, decay, steps, found_inf, fused=False) -> None:
    """p ← p·(1 − decay) − step·update in place for each param (decay and each step: floats, or tensors where lr is
    one). A skipped step (``found_inf``) changes nothing, decided on the device. ``fused`` (the cpu backend): one
    pass in the C++ kernel fastopt::decayed_update_ where it applies (float lr, both contiguous: not the transposed
    result of a tall matrix). Otherwise, with a float lr and no found_inf, the params of one step size are updated
    by two foreach ops (two launches on a GPU instead of two per param), else each by torch ops."""
    together = {}
    for p, update, step in zip(params, updates, steps):
        if fused and found_inf is None and not isinstance(step, torch.Tensor) and p.is_contiguous() and \
                update.is_contiguous() and update.dtype in (torch.float32, torch.bfloat16) and p.dtype in KERNEL_DTYPES:
            torch.ops.fastopt.decayed_update_(p, update, float(decay), float(step))
        elif found_inf is not None:
            keep = 1 - found_inf.to(p.dtype)
            p.mul_(1 - decay * keep).sub_(update * (step * keep))
        elif isinstance(step, torch.Tensor):
            p.mul_(1 - decay).sub_(update * step)
        else:
            ps, us = together.setdefault(float(step), ([], []))
            ps.append(p)
            us.append(update)
    for step, (ps, us) in together.items():
        torch._foreach_mul_(ps, 1 - decay)
        torch._foreach_add_(ps, us, alpha=-step)


def momentum_pass(backend, bucket, grad_scale, found_inf, block_size, accumulate_, direction, kernel) -> tuple:
    """(each param's M, its ‖M‖_F or None): on the cpu and triton backends (not a GradScaler step) a param with a
    contiguous grad and buffer for which ``kernel(i, g)`` gives the kernel's (coefficients, dtype) takes the momentum
    kernel: on cpu the C++ op per param (momentum_direction, M in that dtype), on triton one launch per buffer dtype
    for the bucket (momentum_directions, M in float32 as the torch ops give it); the others go through
    momentum_steps together, with ``accumulate_`` and ``direction``."""
    fused = backend in ("cpu", "triton") and grad_scale is None and found_inf is None
    n = len(bucket.params)
    directions, norms, rest, launches = [None] * n, [None] * n, [], {}
    for i, (g, state) in enumerate(zip(bucket.grads, bucket.states)):
        contiguous = g.is_contiguous() and state["momentum_buffer"].is_contiguous()
        args = kernel(i, g) if fused and contiguous else None
        if args is None:
            rest.append(i)
        elif backend == "cpu":
            directions[i], norms[i] = momentum_direction(state, g, *args, block_size)
        else:
            launches.setdefault((args[0], state["momentum_buffer"].dtype, g.dtype), []).append(i)
    for (coefficients, *_), members in launches.items():
        found = momentum_directions([bucket.states[i] for i in members], [bucket.grads[i] for i in members],
                                    coefficients, block_size)
        for i, d, norm in zip(members, *found):
            directions[i], norms[i] = d, norm
    if rest:
        for i, m in zip(rest, momentum_steps([bucket.states[i] for i in rest],
                                             [unscaled(bucket.grads[i], grad_scale) for i in rest], found_inf,
                                             block_size, accumulate_, direction)):
            directions[i] = m
    return directions, norms


def momentum_steps(states, grads, found_inf, block_size, accumulate_, direction) -> list:
    """Fold each ``g`` into its ``state["momentum_buffer"]`` (any storage dtype) with ``accumulate_(Bs, gs)`` (in
    place, on lists: foreach ops) and return ``direction(gs, Bs)``. Buffers stored in the gradients' dtype are updated
    in place; the others are loaded, updated and stored back, fp8 ones of one shape as one stack where their blocks
    do not straddle matrices (the quantiser's ~25 launches once per shape, not per matrix; the same codes). A
    skipped step (``found_inf``) keeps every B, decided on the device."""
    units = []  # (indices, stored buffer, its fp8 scales or None, gradient): one matrix, or a stack of fp8 ones
    for members in _fp8_stacks(states, grads, block_size):
        if len(members) == 1:
            state = states[members[0]]
            units.append((members, state["momentum_buffer"], state.get("momentum_buffer_scale"), grads[members[0]]))
        else:
            codes = torch.stack([states[i]["momentum_buffer"].view(torch.uint8) for i in members])
            units.append((members, codes.view(torch.float8_e4m3fn),
                          torch.cat([states[i]["momentum_buffer_scale"] for i in members]),
                          torch.stack([grads[i] for i in members])))
    unit_grads = [g for *_, g in units]
    bufs = [stored if stored.dtype == g.dtype and found_inf is None else load(stored, scale, block_size, g.dtype)
            for (_, stored, scale, _), g in zip(units, unit_grads)]
    old = [b.clone() for b in bufs] if found_inf is not None else None
    accumulate_(bufs, unit_grads)
    if found_inf is not None:
        skip = found_inf.to(torch.bool)
        bufs = [torch.where(skip, o, b) for o, b in zip(old, bufs)]
    directions = [None] * len(states)
    for (members, stored, scale, _), b, d in zip(units, bufs, direction(unit_grads, bufs)):
        if b is not stored:
            store(stored, scale, b, block_size)
        if len(members) == 1:
            directions[members[0]] = d
            continue
        torch._foreach_copy_([states[i]["momentum_buffer"].view(torch.uint8) for i in members],
                             list(stored.view(torch.uint8).unbind(0)))
        torch._foreach_copy_([states[i]["momentum_buffer_scale"] for i in members], list(scale.chunk(len(members))))
        for i, m in zip(members, d.unbind(0)):
            directions[i] = m
    return directions


def _fp8_stacks(states, grads, block_size) -> list:
    """Indices grouped into units: fp8 buffers of one shape and grad dtype whose numel is a multiple of the block
    size together (a shape of one matrix: a unit of one), every other buffer alone."""
    stacks, units = {}, []
    for i, (state, g) in enumerate(zip(states, grads)):
        if state["momentum_buffer"].dtype == torch.float8_e4m3fn and g.numel() % block_size == 0:
            stacks.setdefault((tuple(g.shape), g.dtype), []).append(i)
        else:
            units.append([i])
    return units + list(stacks.values())


def momentum_direction(state, g, coefficients, dtype, block_size) -> tuple[torch.Tensor, torch.Tensor]:
    """(M in ``dtype``, ‖M‖_F) from the CPU kernel fastopt::momentum_direction_: B ← β·B + γ·g in place on
    ``state["momentum_buffer"]`` (any storage dtype) and M = δ·g + ε·B in one pass (``coefficients``: (β, γ, δ, ε)).
    """
    direction = torch.empty(g.shape, dtype=dtype)
    sumsq = torch.empty((), dtype=torch.float64)
    torch.ops.fastopt.momentum_direction_(state["momentum_buffer"], state.get("momentum_buffer_scale"), block_size, g,
                                          direction, sumsq, *coefficients)
    if not torch.isfinite(sumsq):  # the float32 block sums overflowed (|M| beyond ~1e19): again in float64
        return direction, torch.linalg.vector_norm(direction, dtype=torch.float64)
    return direction, sumsq.sqrt_()


def momentum_directions(states, grads, coefficients, block_size) -> tuple[list, list]:
    """(each M in float32, each ‖M‖_F) from the Triton kernel, one launch: B ← β·B + γ·g in place on each
    ``state["momentum_buffer"]`` (one storage dtype) and M = δ·g + ε·B (``coefficients``: (β, γ, δ, ε))."""
    directions = [torch.empty(g.shape, dtype=torch.float32, device=g.device) for g in grads]
    sumsqs = torch.empty(len(grads), dtype=torch.float64, device=grads[0].device)
    scales = [s["momentum_buffer_scale"] for s in states if "momentum_buffer_scale" in s]
    momentum_direction_triton_([s["momentum_buffer"] for s in states], scales, block_size, grads, directions, sumsqs,
                               *coefficients)
    return directions, sumsqs.sqrt_().unbind()


def on_matrices(orthogonalise_flat):
    """``orthogonalise_flat(matrices, norms)`` for tensors of two or more dimensions: each flattened to
    (rows, ·), each result reshaped back (a conv weight's (out, in·k·k) matrix)."""
    def run(tensors, norms) -> list:
        flat = [t.reshape(t.shape[0], -1) for t in tensors]
        return [o.reshape(t.shape) for o, t in zip(orthogonalise_flat(flat, norms), tensors)]
    return run


def orthogonalise(directions, options, backend, prepare=None, norms=None) -> list:
    """Newton-Schulz (``options``: its keywords) on each matrix, one stacked batch per shape; on the CPU engine only
    shapes it batches are stacked (for the others stacking would only copy). ``prepare`` maps one matrix or a stack
    to (x, its Frobenius norm(s) or None); ``norms``: each direction's norm where known (or None)."""
    orthogonal = [None] * len(directions)
    by_shape = {}
    for i, d in enumerate(directions):
        by_shape.setdefault(tuple(d.shape), []).append(i)
    for members in by_shape.values():
        known = norms is not None and all(norms[i] is not None for i in members)
        if backend == "cpu" and not cpu_batches(*directions[members[0]].shape):
            for i in members:
                matrix, norm = prepare(directions[i]) if prepare else (directions[i], norms[i] if known else None)
                orthogonal[i] = newton_schulz(matrix, norm=norm, **options)
            continue
        batch = torch.stack([directions[i] for i in members])
        batch, norm = prepare(batch) if prepare else (batch, torch.stack([norms[i] for i in members]) if known
                                                     else None)
        for i, o in zip(members, newton_schulz(batch, norm=norm, **options)):
            orthogonal[i] = o
    return orthogonal
