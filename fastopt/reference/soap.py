"""SOAP (Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam", nikhilvyas/SOAP) in plain
torch, fp64-capable: Adam run in the eigenbasis of Shampoo's preconditioner, for one tensor.

Per dimension d of the gradient G that is at most ``max_precond_dim`` (1-D tensors only with
``precondition_1d``), a factor F_d (the EMA of G contracted with itself over all other dimensions; for a
matrix L = EMA(G·Gᵀ) and R = EMA(Gᵀ·G)) and its eigenbasis Q_d; other dimensions stay unrotated.
``project`` rotates every dimension into its basis (a matrix: Q_Lᵀ·G·Q_R), ``project_back`` undoes it.
With ``merge_dims`` a tensor of 2+ dimensions is first viewed as ``merged_shape`` (the official rule).
With ``partition_block_size`` b (Levanter's ``partition_grads_into_blocks``, blocks of 256–512 in the paper's
runs), every preconditioned dimension above b is cut into chunks of b (the last may be shorter) and each block of
the chunk grid is its own SOAP tensor, with its own factors and bases (at most b×b each, whatever the tensor's
size); the moments keep the tensor's shape, each block's region holding that block's values.

* First call: the factors take the gradient (F ← β_s·0 + (1−β_s)·…), Q_d = the eigenvectors of F_d + 1e-30·I
  in descending eigenvalue order (``eigh`` in the factor's dtype, float64 if that fails: counted in the state's
  "eigh_fallbacks", with a warning); no update.
* Every later call, t = 1, 2, … (the call's number minus one):

      m ← β1·m + (1−β1)·G                      (first moment, original space)
      v ← β2·v + (1−β2)·project(G)²            (second moment, eigenbasis)
      u = project_back(project(m) / (√v + ε));  u ← u / (1e-30 + rms(u)) with ``normalize_grads``
      p ← p − η·√(1−β2ᵗ)/(1−β1ᵗ)·u  (η alone without ``correct_bias``);  p ← p − η·λ·p
      F_d ← β_s·F_d + (1−β_s)·(G contracted over the other dimensions)
      every ``precondition_frequency`` steps, per d: P = F_d·Q_d, the columns sorted by the estimated
      eigenvalues diag(Q_dᵀ·P) (descending), v permuted along d to match, Q_d ← the Q of the QR of P.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings

import torch


def merged_shape(shape, max_precond_dim: int) -> tuple:
    """The official ``merge_dims`` rule: consecutive dimensions from the left are multiplied together while the
    product stays at most ``max_precond_dim``; a dimension that does not fit starts the next group (one above the
    limit stands alone). E.g. (64, 3, 3, 3) → (64, 27) at 100; (2, 3, 6) → (6, 6) at 6."""
    merged, current = [], 1
    for size in shape:
        if current * size <= max_precond_dim:
            current *= size
        elif current > 1:
            merged.append(current)
            current = size
        else:
            merged.append(size)
    if current > 1 or not merged:
        merged.append(current)
    return tuple(merged)


def _preconditioned_dims(grad: torch.Tensor, max_precond_dim: int, precondition_1d: bool) -> list[bool]:
    if grad.ndim == 1 and not precondition_1d:
        return [False]
    return [size <= max_precond_dim for size in grad.shape]


# The step works on stacks: a batch of B same-shape tensors (B, *shape) with factors and bases stacked per dimension
# (B, n, n) (one tensor is a batch of one; the blocks of a partition are batched by block shape).

def _contract(grad: torch.Tensor, dim: int) -> torch.Tensor:
    """Each tensor of a batch contracted with itself over every dimension but ``dim``: (B, size, size)."""
    rows = grad.movedim(dim + 1, 1).reshape(grad.shape[0], grad.shape[dim + 1], -1)
    return rows @ rows.mT


class WorkBuffers:
    """Two reusable buffers per dtype and device for a chain of products: ``take`` gives the one the product's
    input does not live in, so a product's result survives the next product (which reads it) but not the one
    after; once grown to the largest tensor, a step's rotations allocate nothing. (On the CPU a fresh tensor of a
    few MB is page-faulted in by the product that writes it: on the 124M GPT's matrices, fastopt.SOAP's step went
    from 4.8 to 4.5 s on the 2-core Xeon with these buffers.)"""

    def __init__(self):
        self._pairs = {}

    def take(self, shape, input: torch.Tensor) -> torch.Tensor:
        pair = self._pairs.setdefault((input.dtype, input.device), [None, None])
        source = input.untyped_storage().data_ptr()
        i = int(pair[0] is not None and pair[0].untyped_storage().data_ptr() == source)
        numel = math.prod(shape)
        if pair[i] is None or pair[i].numel() < numel:
            pair[i] = torch.empty(numel, dtype=input.dtype, device=input.device)
        return pair[i][:numel].view(shape)


def _project(x: torch.Tensor, bases: list, back: bool = False, buffers: WorkBuffers | None = None) -> torch.Tensor:
    """project for a batch x (B, *shape) and stacked bases (B, n, n) (None: unrotated); each rotation's result in
    a new tensor, or in ``buffers``."""
    for d, q in enumerate(bases):
        if q is not None:
            rows = x.movedim(d + 1, -1)
            flat = rows.reshape(x.shape[0], -1, rows.shape[-1])
            out = None if buffers is None else buffers.take(flat.shape, flat)
            x = torch.matmul(flat, q.mT if back else q, out=out).reshape(rows.shape).movedim(-1, d + 1)
    return x


def project(x: torch.Tensor, bases: list, back: bool = False) -> torch.Tensor:
    """x with every dimension d rotated by Q_d (forward: Q_dᵀ along d; back: Q_d); None: unrotated."""
    return _project(x[None], [None if q is None else q[None] for q in bases], back)[0]


def _eigenbases(factors: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The eigenvectors of each factor + 1e-30·I (B, n, n) in descending eigenvalue order, and how many needed
    float64 (eigh fails on some ill-conditioned fp32 inputs: those are retried one by one, with a warning)."""
    shifted = factors + 1e-30 * torch.eye(factors.shape[-1], dtype=factors.dtype, device=factors.device)
    try:
        return torch.linalg.eigh(shifted)[1].flip(-1), 0
    except RuntimeError:
        pass
    vectors, fallbacks = torch.empty_like(shifted), 0
    for i, factor in enumerate(shifted):
        try:
            vectors[i] = torch.linalg.eigh(factor)[1]
        except RuntimeError as error:
            warnings.warn(f"SOAP: eigh of a {tuple(factor.shape)} {factor.dtype} factor failed ({error}); retrying "
                          f"in float64", RuntimeWarning, stacklevel=3)
            vectors[i] = torch.linalg.eigh(factor.double())[1].to(factor.dtype)
            fallbacks += 1
    return vectors.flip(-1), fallbacks


def update_factors(grad: torch.Tensor, factors: list, shampoo_beta: float) -> None:
    """F_d ← β_s·F_d + (1−β_s)·(G contracted over the other dimensions), for every factor that is not None; a batch
    grad (B, *shape) and stacked factors (B, n, n)."""
    for d, factor in enumerate(factors):
        if factor is not None:
            factor.lerp_(_contract(grad, d), 1 - shampoo_beta)


def _refresh_bases(state) -> None:
    """One power iteration and QR per factor; the second moment permuted to the new column order (batched)."""
    exp_avg_sq = state["exp_avg_sq"]
    for d, (factor, q) in enumerate(zip(state["GG"], state["Q"])):
        if factor is None:
            continue
        power = factor @ q
        order = torch.argsort((q * power).sum(-2), descending=True)  # (B, n)
        index = order.view(order.shape[0], *[1] * d, -1, *[1] * (exp_avg_sq.ndim - d - 2)).expand_as(exp_avg_sq)
        exp_avg_sq = exp_avg_sq.gather(d + 1, index)
        state["Q"][d] = torch.linalg.qr(power.gather(-1, order[:, None, :].expand_as(power)))[0]
    state["exp_avg_sq"] = exp_avg_sq


@torch.no_grad()
def soap_step(p: torch.Tensor, grad: torch.Tensor, state: dict, step: int, *, lr: float, betas=(0.95, 0.95),
              shampoo_beta: float | None = None, eps: float = 1e-8, weight_decay: float = 0.01,
              precondition_frequency: int = 10, max_precond_dim: int = 10000, precondition_1d: bool = False,
              correct_bias: bool = True, normalize_grads: bool = False, merge_dims: bool = False,
              partition_block_size: int | None = None, projected_momentum: bool = False,
              factor_update=update_factors, buffers: WorkBuffers | None = None) -> None:
    """One SOAP step on ``p`` in place (see the module docstring). ``step``: this call's number, from 1 (the
    first only builds the bases, so t = step − 1); ``state`` starts as {} (or with zero moments) and holds the
    first moment, "exp_avg_sq", "GG" and "Q" (one entry per dimension, None where unrotated);
    ``factor_update(grad, factors, shampoo_beta)`` is the factor EMA (a kernel may stand in). ``merge_dims``:
    the step runs on p viewed as ``merged_shape`` (factors per merged dimension; the moments keep p's shape).
    ``projected_momentum``: the first moment is kept as project(m) under "exp_avg_projected" (the official code
    keeps m as "exp_avg"): between refreshes project(m) ← β1·project(m) + (1−β1)·project(G) (projection is
    linear), which saves projecting m every step; a refresh re-projects it (back with the old bases, forward
    with the new). Same update up to rounding. ``partition_block_size``: the blocks' state is the list
    "blocks" (per class of same-shape blocks of ``partition``, their "GG" and "Q" stacked (B, n, n), in the
    class's row-major block order) in place of "GG" and "Q". ``buffers``: where the rotations of the gradient and
    of the update are computed (new tensors by default; one WorkBuffers may serve many calls)."""
    options = dict(lr=lr, betas=betas, shampoo_beta=_factor_beta(shampoo_beta, betas), eps=eps,
                   weight_decay=weight_decay, precondition_frequency=precondition_frequency, correct_bias=correct_bias,
                   normalize_grads=normalize_grads, momentum_key="exp_avg_projected" if projected_momentum
                   else "exp_avg", factor_update=factor_update, buffers=buffers)
    if ("blocks" in state) != (partition_block_size is not None) and ("Q" in state or "blocks" in state):
        raise ValueError(f"soap_step: a state {'with' if 'blocks' in state else 'without'} partition blocks, called "
                         f"with partition_block_size={partition_block_size} (the block size cannot change mid-run)")
    step_fn = _whole_step if partition_block_size is None else functools.partial(_partitioned_step,
                                                                                     block=partition_block_size)
    if not (merge_dims and p.ndim > 1):
        layout = _preconditioned_dims(grad, max_precond_dim, precondition_1d)
        return step_fn(p, grad, state, step - 1, layout, **options)
    shape = merged_shape(p.shape, max_precond_dim)
    moments = (options["momentum_key"], "exp_avg_sq")
    view = {k: v.view(shape) if k in moments else v for k, v in state.items()}
    target = p.view(shape) if p.is_contiguous() else p.reshape(shape).clone()
    # a tensor merged down to one dimension keeps its factor (the 1-D rule is about vector parameters)
    step_fn(target, grad.reshape(shape), view, step - 1, [n <= max_precond_dim for n in shape], **options)
    state.update({k: v.reshape(p.shape) if k in moments else v for k, v in view.items()})
    if target.data_ptr() != p.data_ptr():
        p.copy_(target.view(p.shape))


def partition(shape, layout: list[bool], block: int) -> list[tuple[tuple, tuple, tuple]]:
    """The blocks of a tensor of ``shape``, in classes of one block shape: (starts, sizes, counts) per class, the class
    holding counts[d] blocks of sizes[d] from starts[d] along each dimension d. Each preconditioned dimension
    (``layout``) above ``block`` is cut into chunks of ``block`` and a shorter last one where it does not divide."""
    per_dim = []
    for n, keep in zip(shape, layout):
        chunks = [(0, n, 1)]
        if keep and n > block:
            chunks = [(0, block, n // block)] + ([(n - n % block, n % block, 1)] if n % block else [])
        per_dim.append(chunks)
    return [tuple(zip(*combo)) for combo in itertools.product(*per_dim)]


def blocked_view(x: torch.Tensor, starts, sizes, counts) -> torch.Tensor:
    """The blocks of one class of x as a view (*counts, *sizes); row-major over counts is the class's batch order."""
    region = x[tuple(slice(s, s + n * c) for s, n, c in zip(starts, sizes, counts))]
    split = region.view([v for c, n in zip(counts, sizes) for v in (c, n)])
    return split.permute(*range(0, 2 * len(sizes), 2), *range(1, 2 * len(sizes), 2))


def _whole_step(p, grad, state, t, layout, *, momentum_key, **options) -> None:
    """_step on one tensor as a batch of one; its factors and bases stay (n, n) in the state (the official layout)."""
    moments = (momentum_key, "exp_avg_sq")
    batch = {k: state[k][None] for k in moments if k in state}
    if "Q" in state:
        batch.update({k: [None if f is None else f[None] for f in state[k]] for k in ("GG", "Q")})
    _step(p[None], grad[None], batch, t, layout, momentum_key=momentum_key, **options)
    state.update({k: batch[k][0] for k in moments})
    state.update({k: [None if f is None else f[0] for f in batch[k]] for k in ("GG", "Q")})
    if "eigh_fallbacks" in batch:
        state["eigh_fallbacks"] = batch["eigh_fallbacks"]


def _partitioned_step(p, grad, state, t, layout, *, block, momentum_key, **options) -> None:
    """_step on every class of same-shape blocks of the partition as one batch, each block with its own factors and
    bases (stacked per class in state["blocks"]) and its region of the moments."""
    classes = partition(grad.shape, layout, block)
    if "blocks" not in state:
        state.setdefault(momentum_key, torch.zeros_like(grad))
        state.setdefault("exp_avg_sq", torch.zeros_like(grad))
        state["blocks"] = [{} for _ in classes]
        state["eigh_fallbacks"] = 0
    factor_shapes = [[(math.prod(counts), n, n) if keep else None for n, keep in zip(sizes, layout)]
                     for _, sizes, counts in classes]
    saved_shapes = [[None if f is None else tuple(f.shape) for f in saved["GG"]] if "GG" in saved else shapes
                    for saved, shapes in zip(state["blocks"], factor_shapes)]
    if len(state["blocks"]) != len(classes) or saved_shapes != factor_shapes:
        raise ValueError(f"soap_step: the state's block factors {saved_shapes} are not those of {tuple(grad.shape)} in "
                         f"blocks of {block}, {factor_shapes} (the block size cannot change mid-run)")
    moments = (momentum_key, "exp_avg_sq")
    for (starts, sizes, counts), saved in zip(classes, state["blocks"]):
        batch_shape = (math.prod(counts), *sizes)
        views = {k: blocked_view(state[k], starts, sizes, counts) for k in moments}
        batch = {**saved, **{k: view.reshape(batch_shape) for k, view in views.items()}}
        _step(blocked_view(p, starts, sizes, counts), blocked_view(grad, starts, sizes, counts).reshape(batch_shape),
              batch, t, layout, momentum_key=momentum_key, **options)
        for k in moments:  # unless reshape could view them and no refresh replaced them, they are copies
            if batch[k].data_ptr() != views[k].data_ptr():
                views[k].copy_(batch[k].view(views[k].shape))
        saved.update(GG=batch["GG"], Q=batch["Q"])
        state["eigh_fallbacks"] += batch.get("eigh_fallbacks", 0)  # set by the first call only


def _factor_beta(shampoo_beta: float | None, betas) -> float:
    """The factors' EMA rate: ``shampoo_beta``, by default β2."""
    return betas[1] if shampoo_beta is None else shampoo_beta


def _step(p, grad, state, t, layout, *, lr, betas, shampoo_beta, eps, weight_decay, precondition_frequency,
          correct_bias, normalize_grads, momentum_key, factor_update, buffers) -> None:
    """soap_step on a batch of same-shape tensors: grad and the state's moments (B, *shape), factors and bases
    stacked (B, n, n), p any view of the B tensors' elements in that order (e.g. a blocked_view); t = step − 1,
    ``layout``: per dimension of ``shape`` whether it has a factor."""
    beta1, beta2 = betas
    if "Q" not in state:
        state.setdefault(momentum_key, torch.zeros_like(grad))
        state.setdefault("exp_avg_sq", torch.zeros_like(grad))
        state["GG"] = [torch.zeros(grad.shape[0], n, n, dtype=grad.dtype, device=grad.device) if keep else None
                       for n, keep in zip(grad.shape[1:], layout)]
        factor_update(grad, state["GG"], shampoo_beta)
        bases = [None if f is None else _eigenbases(f) for f in state["GG"]]
        state["Q"] = [None if b is None else b[0] for b in bases]
        state["eigh_fallbacks"] = sum(b[1] for b in bases if b is not None)
        return  # the first gradient only builds the bases: it is never projected with itself
    projected_grad = _project(grad, state["Q"], buffers=buffers)
    if projected_grad.data_ptr() == grad.data_ptr():  # nothing rotated: a view of grad, which is reused below
        projected_grad = projected_grad.clone()
    if momentum_key == "exp_avg":
        state["exp_avg"].lerp_(grad, 1 - beta1)
        projected_momentum = _project(state["exp_avg"], state["Q"])
    else:
        projected_momentum = state[momentum_key].lerp_(projected_grad, 1 - beta1)
    # projected_grad's buffer, no longer needed, takes G², then √v + ε, then the ratio: the same values as fresh
    # tensors, without allocating three (on the 124M GPT's matrices, side by side: 10.3 → 9.6 s a step on the CPU)
    v = state["exp_avg_sq"].lerp_(projected_grad.square_(), 1 - beta2)
    ratio = torch.div(projected_momentum, torch.sqrt(v, out=projected_grad).add_(eps), out=projected_grad)
    update = _project(ratio, state["Q"], back=True, buffers=buffers)
    if normalize_grads:  # per tensor of the batch
        update = update / (1e-30 + update.square().mean(tuple(range(1, update.ndim)), keepdim=True).sqrt())
    step_size = lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t) if correct_bias else lr
    p.add_(update.reshape(p.shape), alpha=-step_size)
    if weight_decay:
        p.add_(p, alpha=-lr * weight_decay)
    factor_update(grad, state["GG"], shampoo_beta)
    if t % precondition_frequency == 0:
        if momentum_key == "exp_avg":
            _refresh_bases(state)
        else:
            momentum = _project(state[momentum_key], state["Q"], back=True)
            _refresh_bases(state)
            state[momentum_key] = _project(momentum, state["Q"]).contiguous()
