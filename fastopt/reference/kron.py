"""PSGD Kron (Xi-Lin Li, lixilinx/psgd_torch; the ``Kron`` of evanatyourservice/kron_torch 0.3.3) in plain torch,
fp64-capable, for one tensor.

A tensor of 3+ dimensions is first viewed as a matrix (``merge_dims``, kron_torch's rule); a 0-d one as (1,). Each
dimension d of size n_d gets a factor Q_d: upper triangular n_d × n_d, or diagonal (a vector) where n_d = 1,
n_d > max_size_triangular, the tensor has fewer than min_ndim_triangular dimensions, or ``memory_save_mode`` says
so. The preconditioner is P = ⊗_d Q_dᵀQ_d; ``x ×_d M`` below is the mode-d product (M applied along dimension d).

One step t = 1, 2, … with gradient G, momentum m, preconditioner learning rate η_p:

    m ← β1·m + (1−β1)·G;  M = m / (1 − β1ᵗ)
    when ``balance`` (matrices only): Q_d ← Q_d · ĝ / max|Q_d|, ĝ the geometric mean of the max|Q_d|
    when ``do_update``: V ~ N(0, I) (drawn in float32 from ``generator``);
        H = M + √ε·mean|M|·V  (ε = float32 machine epsilon; G in place of M without momentum_into_precond_update)
        A = H ×_1 Q_1 ⋯ ×_k Q_k,   B = V ×_1 Q_1⁻ᵀ ⋯ ×_k Q_k⁻ᵀ   (triangular solves), both with the old factors
        per d, T1 = A_(d)·A_(d)ᵀ, T2 = B_(d)·B_(d)ᵀ (Gram matrices over the other dimensions; diagonals only for
        a diagonal factor):
            triangular: Q_d ← Q_d − η_p / max(lb(T1 + T2), tiny) · triu(T1 − T2) · Q_d
            diagonal:   q_d ← q_d − η_p / max(max|T1 + T2|, tiny) · (T1 − T2) ⊙ q_d
        (lb: a lower bound of the spectral norm, one power-iteration step from the largest column;
        tiny: the smallest normal number of the factors' dtype); with momentum_into_precond_update, M ← H
        (kron_torch adds the noise to the momentum in place, so the damped M is what gets preconditioned)
    u = P·M = M ×_1 Q_1ᵀQ_1 ⋯ ×_k Q_kᵀQ_k;   u ← u · min(1, 1.1 / (rms(u) + 1e-12))
    p ← p − η·(u + λ·p)   (λ only for parameters of 2+ dimensions)

Whether a step updates the preconditioner is decided by the caller (fastopt.optim.kron.Kron: kron_torch's
deterministic counter on ``preconditioner_update_probability``, by default ``precond_update_prob_schedule()``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

MEMORY_SAVE_MODES = (None, "smart_one_diag", "one_diag", "all_diag")
RMS_CLIP = 1.1
_SQRT_EPS = math.sqrt(torch.finfo(torch.float32).eps)


@dataclass(frozen=True)
class UpdateProbSchedule:
    """kron_torch's update-probability schedule: max_prob·exp(−decay·(n − flat_start)) clamped to
    [min_prob, max_prob], in float32, for the optimizer's step index n = 0, 1, …"""

    max_prob: float = 1.0
    min_prob: float = 0.03
    decay: float = 0.001
    flat_start: float = 500

    def __call__(self, n) -> torch.Tensor:
        n = torch.as_tensor(n, dtype=torch.float32)
        return (self.max_prob * torch.exp(-self.decay * (n - self.flat_start))).clamp(self.min_prob, self.max_prob)


def precond_update_prob_schedule(max_prob=1.0, min_prob=0.03, decay=0.001, flat_start=500) -> UpdateProbSchedule:
    """1.0 for the first 500 steps, then annealed exponentially to 0.03 (reached at step ~4000)."""
    return UpdateProbSchedule(max_prob, min_prob, decay, flat_start)


def merged_shape(shape, merge_dims: bool = True) -> tuple:
    """The shape the factors are built for: (1,) for a scalar; with ``merge_dims`` a 3+-D tensor becomes
    (∏shape[:-1], shape[-1]) or (shape[0], ∏shape[1:]), whichever has the smaller signed difference last − first
    (kron_torch's comparison of np.diff)."""
    shape = tuple(shape) or (1,)
    if len(shape) <= 2 or not merge_dims:
        return shape
    first, last = (math.prod(shape[:-1]), shape[-1]), (shape[0], math.prod(shape[1:]))
    return first if first[1] - first[0] <= last[1] - last[0] else last


def factor_layout(shape, max_size_triangular: int = 8192, min_ndim_triangular: int = 2,
                  memory_save_mode: str | None = None) -> list[bool]:
    """Per dimension of ``shape`` (already merged): True for a triangular factor, False for a diagonal one."""
    if memory_save_mode not in MEMORY_SAVE_MODES:
        raise ValueError(f"memory_save_mode must be one of {MEMORY_SAVE_MODES}, got {memory_save_mode!r}")
    diagonal = [memory_save_mode == "all_diag"] * len(shape)
    largest = max(range(len(shape)), key=lambda d: (shape[d], d))  # the last of the largest, as np.argsort picks
    ordered = sorted(shape)
    if memory_save_mode == "one_diag" or (memory_save_mode == "smart_one_diag" and len(shape) > 1
                                          and ordered[-1] > ordered[-2]):
        diagonal[largest] = True
    return [not (diag or n == 1 or n > max_size_triangular or len(shape) < min_ndim_triangular)
            for n, diag in zip(shape, diagonal)]


def init_factors(shape, triangular: list[bool], scale: float = 1.0, dtype=torch.float32, device=None) -> list:
    """scale^(1/k)·I (triangular) or scale^(1/k)·1 (diagonal) per dimension, k = len(shape)."""
    s = scale ** (1 / len(shape))
    return [s * (torch.eye(n, dtype=dtype, device=device) if tri else torch.ones(n, dtype=dtype, device=device))
            for n, tri in zip(shape, triangular)]


def solve_triangular_right(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x · q⁻¹ over x's last dimension, for an upper-triangular q, written over x where x's matrices are row- or
    column-major (the solver then needs no copy); batched: x (B, …, n), q (B, n, n)."""
    rows = x.reshape(*q.shape[:-2], -1, x.shape[-1])
    return torch.linalg.solve_triangular(q, rows, upper=True, left=False, out=rows).reshape(x.shape)


def norm_lower_bound(a: torch.Tensor) -> torch.Tensor:
    """A lower bound of the spectral norm of a symmetric positive semidefinite matrix (kron_torch's ``_lb``):
    ‖a·x‖ for x the normalised a·c, c the column of ``a`` with the largest norm (a row's: a is symmetric); 0 for
    a zero matrix. ``a``: (…, n, n). kron_torch divides ``a`` by its largest |entry| first (no overflow); dividing
    the vectors instead gives the same bound up to rounding with no n×n temporary (any column would give a lower
    bound), and for a semidefinite matrix the largest |entry| is on the diagonal (|a_ij| ≤ √(a_ii·a_jj))."""
    max_abs = a.diagonal(0, -2, -1).abs().amax(-1)
    safe = torch.where(max_abs > 0, max_abs, 1.0)[..., None]
    largest = torch.linalg.vector_norm(a, dim=-1).argmax(-1)
    column = a.gather(-2, largest[..., None, None].expand(*a.shape[:-2], 1, a.shape[-1]))[..., 0, :] / safe
    x = (column[..., None, :] @ a)[..., 0, :] / safe
    x = x / x.norm(dim=-1, keepdim=True)
    return torch.where(max_abs > 0, (a @ x[..., None])[..., 0].norm(dim=-1), max_abs)


def _along(x: torch.Tensor, d: int, fn) -> torch.Tensor:
    """fn applied to the rows of a batch x (B, …) that run along dimension d of each tensor, as (B, rows, n_d)."""
    moved = x.movedim(d + 1, -1)
    return fn(moved.reshape(x.shape[0], -1, moved.shape[-1])).reshape(moved.shape).movedim(-1, d + 1)


def _gram(x: torch.Tensor, d: int, triangular: bool, products) -> torch.Tensor:
    """x_(d)·x_(d)ᵀ per tensor of a batch x (its diagonal for a diagonal factor), x_(d) the mode-d unfolding."""
    rows = x.movedim(d + 1, 1).reshape(x.shape[0], x.shape[d + 1], -1)
    return products.gram(rows) if triangular else rows.square().sum(-1)


def _mm_t(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return x @ q.mT


def _mm_gram(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (x @ q.mT) @ q


def _gram_dense(x: torch.Tensor) -> torch.Tensor:
    return x @ x.mT


def _triu_mm(u: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return u.triu_() @ q


@dataclass(frozen=True)
class Products:
    """The matrix products of a step: with an upper-triangular factor Q, x·Qᵀ, x·QᵀQ and triu(U)·Q (U a
    temporary the product may overwrite), and the Gram matrices x·xᵀ. The reference
    multiplies densely; a backend may pass products that skip a zero triangle (fastopt.ops.triangular) or
    compute one symmetric half."""

    mm_t: Callable = _mm_t
    mm_gram: Callable = _mm_gram
    upper_mm: Callable = _triu_mm
    gram: Callable = _gram_dense


DENSE = Products()


def _batch(factors: list, *tensors, batched: bool):
    """The factors and tensors with a leading batch dimension (views: in-place factor updates write through)."""
    if batched:
        return factors, *tensors
    return [q[None] for q in factors], *(t[None] for t in tensors)


def update_factors(factors: list, h: torch.Tensor, v: torch.Tensor, precond_lr: float, *, batched=False,
                   products: Products = DENSE) -> None:
    """One whitening step on the factors in place, from the (damped) gradient h and the noise v (module docstring;
    h is kept, v is overwritten: B is computed in its memory). ``batched``: h, v are (B, *shape) stacks of
    same-layout tensors and each factor a (B, n, n) or (B, n) stack."""
    factors, a, b = _batch(factors, h, v, batched=batched)
    for d, q in enumerate(factors):
        if q.ndim == 3:
            a = _along(a, d, lambda rows, q=q: products.mm_t(rows, q))
            b = _along(b, d, lambda rows, q=q: solve_triangular_right(rows, q))
        else:  # a is a product of h's after the first dimension: scaled in place from then on
            a = _along(a, d, lambda rows, q=q, own=d > 0: rows.mul_(q[:, None]) if own else rows * q[:, None])
            b = _along(b, d, lambda rows, q=q: rows.div_(q[:, None]))
    for d, q in enumerate(factors):
        triangular = q.ndim == 3
        t1, t2 = _gram(a, d, triangular, products), _gram(b, d, triangular, products)
        tiny = torch.finfo(q.dtype).tiny
        if triangular:  # temporaries, in place: t1 becomes T1 − T2, t2 the sum T1 + T2 = (T1 − T2) + 2·T2
            difference = t1.sub_(t2)
            step = precond_lr / norm_lower_bound(torch.add(difference, t2, alpha=2, out=t2)).clamp(min=tiny)
            q.addcmul_(products.upper_mm(difference, q), step[:, None, None], value=-1)
        else:
            q.sub_((t1 - t2) * q * (precond_lr / (t1 + t2).abs().amax(-1, keepdim=True).clamp(min=tiny)))


def precondition(factors: list, x: torch.Tensor, *, batched=False, products: Products = DENSE) -> torch.Tensor:
    """P·x: x ×_d Q_dᵀQ_d for every d (x·Qᵀ then ·Q per triangular factor, q² for a diagonal one); x is kept."""
    factors, x = _batch(factors, x, batched=batched)
    for d, q in enumerate(factors):  # after the first dimension x is a product of ours: scaled in place
        x = _along(x, d, (lambda rows, q=q: products.mm_gram(rows, q)) if q.ndim == 3 else
                   (lambda rows, q=q, own=d > 0: rows.mul_((q * q)[:, None]) if own else rows * (q * q)[:, None]))
    return x if batched else x[0]


def rms_clip_scale(u: torch.Tensor, *, batched=False) -> torch.Tensor:
    """min(1, 1.1 / (rms(u) + 1e-12)), rms = ‖u‖/√numel: the factor that clips u's RMS to 1.1; per tensor of a
    batch, shape (B,), when ``batched``."""
    dims = tuple(range(1, u.ndim)) if batched else tuple(range(u.ndim))
    rms = torch.linalg.vector_norm(u, dim=dims) / math.sqrt(math.prod(u.shape[d] for d in dims))
    return (RMS_CLIP / (rms + 1e-12)).clamp(max=1.0)


def balance_factors(factors: list, *, batched=False) -> None:
    """Rescale the factors in place to the geometric mean of their max-abs norms (their product is unchanged)."""
    factors, = _batch(factors, batched=batched)
    norms = torch.stack([q.flatten(1).abs().amax(1) for q in factors])
    target = norms.log().mean(0).exp()
    for q, norm in zip(factors, norms):
        q.mul_((target / norm).view(-1, *[1] * (q.ndim - 1)))


def whiten_and_precondition(factors: list, direction: torch.Tensor, source: torch.Tensor, v: torch.Tensor | None,
                            precond_lr: float, balance: bool, momentum_into_precond_update: bool,
                            products: Products = DENSE) -> torch.Tensor:
    """The preconditioner part of a step for a batch of same-layout tensors (B, *shape) and their stacked factors:
    balance (2+ dimensions), then, when the noise ``v`` is given, the whitening update from
    H = source + √ε·mean|source|·v (``source``: the momentum direction or the gradient); returns P·M per tensor
    (unclipped: ``rms_clip_scale`` gives the clip), M = H with ``momentum_into_precond_update`` else ``direction``."""
    if balance and direction.ndim > 2:
        balance_factors(factors, batched=True)
    if v is not None:
        dims = tuple(range(1, source.ndim))
        scale = _SQRT_EPS * torch.linalg.vector_norm(source, ord=1, dim=dims, keepdim=True) / source[0].numel()
        damped = torch.addcmul(source, scale, v)
        update_factors(factors, damped, v, precond_lr, batched=True, products=products)
        if momentum_into_precond_update:
            direction = damped
    return precondition(factors, direction, batched=True, products=products)


def update_momentum(momentum: torch.Tensor, grad: torch.Tensor, b1: float, step: int, shape, dtype,
                    momentum_into_precond_update: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """m ← β1·m + (1−β1)·G in place; returns (M = m / (1 − β1ᵗ), the whitening source: M, or G without
    ``momentum_into_precond_update``), both viewed as ``shape`` in ``dtype``."""
    momentum.mul_(b1).add_(grad, alpha=1 - b1)
    direction = (momentum / (1 - b1 ** step)).reshape(shape).to(dtype)
    return direction, direction if momentum_into_precond_update else grad.reshape(shape).to(dtype)


def draw_noise(shape, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """V ~ N(0, I), drawn in float32 whatever ``dtype`` (the same numbers for every compute dtype)."""
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)


def apply_update(p: torch.Tensor, u: torch.Tensor, lr: float, weight_decay: float, clip) -> None:
    """p ← p − η·(c·u + λ·p), c = ``clip`` (a number or 0-d tensor), λ only for parameters of 2+ dimensions; ``u``
    has p's size in any shape (and is overwritten)."""
    u = u.reshape(p.shape).mul_(clip)
    if weight_decay and p.ndim >= 2:
        u = u.add_(p, alpha=weight_decay)
    p.add_(u.to(p.dtype), alpha=-lr)


@torch.no_grad()
def kron_step(p: torch.Tensor, grad: torch.Tensor, state: dict, step: int, *, lr: float = 3e-4, b1: float = 0.9,
              weight_decay: float = 0.0, do_update: bool = True, balance: bool = False,
              momentum_into_precond_update: bool = True, precond_lr: float = 0.1, precond_init_scale: float = 1.0,
              max_size_triangular: int = 8192, min_ndim_triangular: int = 2, memory_save_mode: str | None = None,
              merge_dims: bool = True, generator: torch.Generator | None = None) -> None:
    """One Kron step on ``p`` in place (see the module docstring). ``step``: this call's number, from 1; ``state``
    starts as {} and holds "momentum_buffer" (shaped like p) and "Q" (the factors, in the momentum's dtype);
    ``generator`` (on p's device) draws the noise V."""
    shape = merged_shape(p.shape, merge_dims)
    if "Q" not in state:
        state.setdefault("momentum_buffer", torch.zeros_like(grad))
        layout = factor_layout(shape, max_size_triangular, min_ndim_triangular, memory_save_mode)
        state["Q"] = init_factors(shape, layout, precond_init_scale, grad.dtype, grad.device)
    factors = state["Q"]
    dtype = factors[0].dtype
    direction, source = update_momentum(state["momentum_buffer"], grad, b1, step, shape, dtype,
                                        momentum_into_precond_update)
    v = draw_noise(shape, generator, p.device, dtype)[None] if do_update else None
    u = whiten_and_precondition([q[None] for q in factors], direction[None], source[None], v, precond_lr, balance,
                                momentum_into_precond_update)[0]
    apply_update(p, u, lr, weight_decay, rms_clip_scale(u))
