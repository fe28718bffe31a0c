"""PSGD Kron: Kronecker-factored whitening preconditioners (fastopt.reference.kron)."""

from __future__ import annotations

import functools
import warnings

import torch

from ..ops.noise import philox_normal
from ..ops.triangular import gram, mm_gram_upper, mm_upper_t, upper_mm_upper
from ..reference.kron import (DENSE, MEMORY_SAVE_MODES, Products, apply_update, draw_noise, factor_layout,
                              init_factors, merged_shape, precond_update_prob_schedule, rms_clip_scale,
                              update_momentum, whiten_and_precondition)
from ..reference.noise import PhiloxStream
from ..reference.update import compute_dtype
from ..state import DEFAULT_BLOCK_SIZE, num_blocks, parse_state_dtype, storage_dtype_for
from .base import FusedOptimizer, check_float
from .muon import momentum_direction, momentum_directions

BALANCE_PROB = 0.01
# parameters whose dimensions are all at most this are stacked by shape: per-call overhead dominates their small
# products (22 -> 12 ms a step on the 64-wide benchmark Llama) and, on a GPU, launches; on the CPU larger ones run
# alone, where one matmul per matrix beats a batched one (cpu backend, medians of 7 steps of n×n stacks, stacked /
# alone: n = 128 41 / 64 ms, 256 75 / 77-81, 384 134 / 127, 512 256 / 224, 1024 808 / 663; a 2-core Intel Xeon)
STACK_MAX_DIM = 1024
STACK_MAX_DIM_CPU = 256
TRIANGULAR = Products(mm_upper_t, mm_gram_upper, upper_mm_upper, gram)  # the cpu backend's: Q's zero triangle skipped
_MU_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


class Kron(FusedOptimizer):
    r"""PSGD Kron (Xi-Lin Li, lixilinx/psgd_torch), following ``kron_torch.Kron`` 0.3.3 (evanatyourservice) with
    its constructor names and defaults. Per parameter, with factors :math:`Q_d` (upper triangular, or diagonal for
    a dimension of size 1 or above ``max_size_triangular``, a tensor of fewer than ``min_ndim_triangular``
    dimensions, or per ``memory_save_mode``) and :math:`P = \bigotimes_d Q_d^\top Q_d`:

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g, \quad M = m / (1-\beta_1^t), \\
        Q_d \leftarrow Q_d - \frac{\eta_p}{\lVert T_1 + T_2 \rVert}\,\mathrm{triu}(T_1 - T_2)\,Q_d
        \ \text{(when due)}, \quad u = \mathrm{clip}_{1.1}(P M), \quad p \leftarrow p - \eta\,(u + \lambda p)

    with :math:`T_1, T_2` the Gram matrices along dimension d of :math:`A = H \times_d Q_d` and of
    :math:`B = V \times_d Q_d^{-\top}` (triangular solves), :math:`V \sim N(0, I)`, :math:`H = M + \sqrt{\epsilon}
    \,\overline{|M|}\,V`, the norm a cheap spectral lower bound (max-abs for a diagonal factor), clip the RMS clip
    to 1.1, and :math:`\lambda` for 2+-D parameters only; fastopt.reference.kron has every detail. The
    preconditioner is updated on kron_torch's deterministic counter (a step ``c`` steps after the last update
    updates once ``c ≥ 1/prob``; ``prob`` is ``preconditioner_update_probability``: a number, a callable of the
    step index, or None for ``precond_update_prob_schedule()``: 1.0 for 500 steps, annealed to 0.03 by ~4k);
    after an update step the factors' norms are balanced with probability 1%.

    Where fastopt differs from kron_torch: the random draws (V, the balance) come from one stream per device
    seeded with ``seed`` (0 ≤ seed < 2⁶³) — on the CPU the counter-based Philox stream of fastopt.reference.noise
    (the cpu backend draws it in a C++ kernel, ~5× torch's ``normal_``), on a GPU a ``torch.Generator`` — whose
    state, with the update counter, lives in the first param group, so a resumed checkpoint takes the same
    decisions as an uninterrupted run (kron_torch draws V from torch's global RNG and the balance from
    ``random.Random(42)``, neither checkpointed); V is drawn in float32 (so float64 runs
    see the same noise); the momentum is kept in ``state_dtype`` (``mu_dtype`` float32/bfloat16 is an alias) and
    in the parameter's shape; the factors are float32 (float64 for float64 parameters; ``precond_dtype`` other
    than float32 is refused); with ``momentum_into_precond_update=False`` the gradient is not damped in place;
    GradScaler works through its unscale-then-step path. Every backend runs the reference's batched functions,
    same-layout parameters up to ``STACK_MAX_DIM`` (``STACK_MAX_DIM_CPU`` on the CPU) stacked into one batch;
    the ``cpu`` backend's products with the triangular factors skip their zero triangle (fastopt.ops.triangular)
    and its momentum pass is the C++ kernel of the orthogonalized optimizers; ``torch``, ``triton`` and ``cuda``
    multiply densely (no Kron GPU kernel yet). The factors of a (50304, 768) embedding are a 50304-vector and a
    768×768 triangle (:func:`kron_state_bytes` gives a parameter's state bytes up front).
    """

    MOMENTS = ("momentum_buffer",)  # kron_torch's state key
    _step_supports_amp_scaling = False  # GradScaler unscales the grads and skips inf steps itself

    def __init__(self, params, lr=3e-4, b1=0.9, weight_decay=0.0, preconditioner_update_probability=None,
                 max_size_triangular=8192, min_ndim_triangular=2, memory_save_mode=None,
                 momentum_into_precond_update=True, precond_lr=0.1, precond_init_scale=1.0, merge_dims=True,
                 mu_dtype=None, precond_dtype=None, *, seed=0, backend=None, state_dtype="fp32",
                 block_size=DEFAULT_BLOCK_SIZE):
        check_float("lr", lr)
        check_float("b1", b1, 0.0, 1.0, high_open=True)
        check_float("weight_decay", weight_decay)
        check_float("precond_lr", precond_lr)
        check_float("precond_init_scale", precond_init_scale)
        if precond_init_scale == 0:
            raise ValueError("invalid precond_init_scale: 0 (the factors must start invertible)")
        prob = preconditioner_update_probability
        if prob is not None and not callable(prob):
            check_float("preconditioner_update_probability", prob, 0.0, 1.0)
        for name, value, low in (("max_size_triangular", max_size_triangular, 1),
                                 ("min_ndim_triangular", min_ndim_triangular, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int ≥ {low}, got {value!r}")
        if memory_save_mode not in MEMORY_SAVE_MODES:
            raise ValueError(f"memory_save_mode must be one of {MEMORY_SAVE_MODES}, got {memory_save_mode!r}")
        if precond_dtype not in (None, torch.float32):
            raise NotImplementedError(f"Kron keeps its factors in float32, got precond_dtype {precond_dtype}")
        if mu_dtype is not None:
            if mu_dtype not in _MU_DTYPES:
                raise NotImplementedError(f"mu_dtype must be None, torch.float32 or torch.bfloat16 (or use "
                                          f"state_dtype), got {mu_dtype}")
            if state_dtype not in ("fp32", _MU_DTYPES[mu_dtype]):
                raise ValueError(f"mu_dtype {mu_dtype} contradicts state_dtype {state_dtype!r}: give one of them")
            state_dtype = _MU_DTYPES[mu_dtype]
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        defaults = dict(lr=lr, b1=b1, weight_decay=weight_decay, preconditioner_update_probability=prob,
                        max_size_triangular=max_size_triangular, min_ndim_triangular=min_ndim_triangular,
                        memory_save_mode=memory_save_mode,
                        momentum_into_precond_update=bool(momentum_into_precond_update), precond_lr=precond_lr,
                        precond_init_scale=precond_init_scale, merge_dims=bool(merge_dims))
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype, block_size=block_size)
        # the optimizer-wide schedule state travels in the state_dict with the first group
        self.param_groups[0].update(seed=seed, update_counter=0, prob_step=0, rng_states={})

    # ---- the per-step decisions --------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        first = self.param_groups[0]
        prob = first["preconditioner_update_probability"]
        if prob is None:
            prob = precond_update_prob_schedule()
        if callable(prob):
            prob = prob(first["prob_step"])
        first["update_counter"] += 1
        self._do_update = bool(prob > 0 and first["update_counter"] >= 1 / prob)
        if self._do_update:
            first["update_counter"] = 0
        first["prob_step"] += 1
        self._rngs = {}
        self._balance = self._do_update and self._rng(torch.device("cpu")).uniform() < BALANCE_PROB
        try:
            return super().step(closure)
        finally:  # a new dict: a state_dict taken earlier keeps its snapshot
            first["rng_states"] = {**first["rng_states"], **{k: g.get_state() for k, g in self._rngs.items()}}

    def _rng(self, device: torch.device) -> PhiloxStream | torch.Generator:
        """This step's random stream for ``device``, resumed from the saved state or seeded: on the CPU the
        counter-based Philox stream of ``seed`` (fastopt.reference.noise), elsewhere a torch.Generator."""
        key = str(device)
        if key not in self._rngs:
            first = self.param_groups[0]
            saved = first["rng_states"].get(key)
            if device.type == "cpu":
                generator = PhiloxStream(first["seed"])
                if saved is not None and saved.dtype == torch.uint8:
                    warnings.warn("this Kron checkpoint holds a torch.Generator state for its CPU noise (an earlier "
                                  "fastopt); the noise now comes from a Philox stream, which starts anew "
                                  "from the seed: the run goes on, but not with the draws it would have taken")
                elif saved is not None:
                    generator.set_state(saved)
            else:
                generator = torch.Generator(device)
                if saved is None:
                    generator.manual_seed(first["seed"])
                else:
                    generator.set_state(saved)
            self._rngs[key] = generator
        return self._rngs[key]

    def _noise(self, shape, device: torch.device, dtype: torch.dtype, backend: str) -> torch.Tensor:
        """V ~ N(0, I) of ``shape`` in ``dtype``, drawn in float32 from ``device``'s stream (on the CPU by the
        cpu backend's kernel, or the reference's torch code: the same numbers to a few ulps)."""
        stream = self._rng(device)
        if isinstance(stream, PhiloxStream):
            return stream.normal(shape, functools.partial(philox_normal, backend=backend)).to(dtype)
        return draw_noise(shape, stream, device, dtype)

    # ---- state and update --------------------------------------------------------------------

    def _init_state(self, p, group) -> dict:
        state = super()._init_state(p, group)
        if "Q" not in state:
            shape = merged_shape(p.shape, group["merge_dims"])
            layout = factor_layout(shape, group["max_size_triangular"], group["min_ndim_triangular"],
                                   group["memory_save_mode"])
            state["Q"] = init_factors(shape, layout, group["precond_init_scale"], compute_dtype(p), p.device)
        return state

    def _update(self, backend, group, bucket, grad_scale, found_inf) -> None:
        """The momentum per parameter, then the preconditioner work on one stack per (shape, layout, dtype). The
        cpu and triton backends run the momentum pass (m and M = m/(1 − β1ᵗ) in one pass, any state dtype) in the
        kernels the orthogonalized optimizers use; the cpu backend's update is one pass too."""
        lr, stacks, fused = float(group["lr"]), {}, backend == "cpu"
        members = [i for i, p in enumerate(bucket.params) if p.numel()]  # (an empty one: no norm of a factor)
        directions = self._momenta(backend, group, bucket, members)
        for i, direction in zip(members, directions):
            p, g, state = bucket.params[i], bucket.grads[i], bucket.states[i]
            dtype, shape = compute_dtype(p), merged_shape(p.shape, group["merge_dims"])
            direction = direction.reshape(shape)
            source = direction if group["momentum_into_precond_update"] else g.reshape(shape).to(dtype)
            # drawn in parameter order: the same numbers as one tensor at a time
            v = self._noise(shape, p.device, dtype, backend) if self._do_update else None
            small = max(shape) <= (STACK_MAX_DIM_CPU if p.device.type == "cpu" else STACK_MAX_DIM)
            key = (shape, tuple(q.ndim for q in state["Q"]), dtype, p.device) if small else id(p)
            stacks.setdefault(key, []).append((p, direction, source, v, state["Q"]))
        for members in stacks.values():
            ps, directions, sources, vs, factors = zip(*members)
            alone = len(members) == 1  # a batch of one views its tensors (its factors: updated in place)
            stack = (lambda tensors: tensors[0][None]) if alone else torch.stack
            stacked = [stack(qs) for qs in zip(*factors)]
            updates = whiten_and_precondition(stacked, stack(directions), stack(sources),
                                              stack(vs) if self._do_update else None, group["precond_lr"],
                                              self._balance, group["momentum_into_precond_update"],
                                              TRIANGULAR if fused else DENSE)
            clips = rms_clip_scale(updates, batched=True)
            for i, (p, u) in enumerate(zip(ps, updates)):
                for q, new in zip(factors[i], stacked if not alone else ()):
                    q.copy_(new[i])
                if fused and not (group["weight_decay"] and p.ndim >= 2):  # one pass, the clip in its alpha
                    p.add_(u.reshape(p.shape), alpha=-lr * float(clips[i]))
                else:
                    apply_update(p, u, lr, group["weight_decay"], clips[i])

    def _momenta(self, backend, group, bucket, members) -> list:
        """M = m/(1 − β1ᵗ) after m ← β1·m + (1−β1)·G for each member of the bucket (float32 params with a contiguous
        grad: on cpu the C++ kernel per param, on triton one launch per step count and storage dtype), in the
        compute dtype; the others by update_momentum on the decoded buffer."""
        b1, directions, launches = group["b1"], {}, {}
        for i in members:
            p, g, state = bucket.params[i], bucket.grads[i], bucket.states[i]
            coefficients = (b1, 1 - b1, 0.0, 1 / (1 - b1 ** int(state["step"])))
            if compute_dtype(p) != torch.float32 or not g.is_contiguous() or backend not in ("cpu", "triton"):
                directions[i] = self._momentum(group, p, g, state)
            elif backend == "cpu":
                directions[i] = momentum_direction(state, g, coefficients, torch.float32, self.block_size)[0]
            else:
                launches.setdefault((coefficients, state["momentum_buffer"].dtype), []).append(i)
        for (coefficients, _), indices in launches.items():
            found = momentum_directions([bucket.states[i] for i in indices], [bucket.grads[i] for i in indices],
                                        coefficients, self.block_size)[0]
            directions.update(zip(indices, found))
        return [directions[i] for i in members]

    def _momentum(self, group, p, g, state) -> torch.Tensor:
        """update_momentum on the state's momentum, decoded from and re-encoded to bf16/fp8 storage around it."""
        dtype = compute_dtype(p)
        stored = state["momentum_buffer"].dtype != dtype
        momentum = self._moment_value(state, "momentum_buffer", p) if stored else state["momentum_buffer"]
        direction, _ = update_momentum(momentum, g, group["b1"], int(state["step"]), p.shape, dtype, False)
        if stored:
            self._store_moment(state, "momentum_buffer", momentum, None)
        return direction

    def _convert_state(self, p, group, saved: dict) -> dict:
        state = super()._convert_state(p, group, saved)
        if "Q" in saved:
            state["Q"] = [q.to(device=p.device, dtype=compute_dtype(p), copy=True) for q in saved["Q"]]
        return state


def kron_state_bytes(shape, dtype=torch.float32, *, state_dtype="fp32", block_size=DEFAULT_BLOCK_SIZE,
                     max_size_triangular=8192, min_ndim_triangular=2, memory_save_mode=None, merge_dims=True) -> int:
    """The bytes of Kron's state for a parameter of ``shape`` and ``dtype``, computed without allocating it:
    the momentum in its storage dtype (+ fp8 scales), the factors (n² per triangular, n per diagonal one), the
    step counter. Uses the same layout rule as the optimizer."""
    moment_dtype = storage_dtype_for(torch.empty(shape, dtype=dtype, device="meta"), parse_state_dtype(state_dtype))
    numel = torch.Size(shape).numel()
    momentum = numel * moment_dtype.itemsize
    if moment_dtype == torch.float8_e4m3fn:
        momentum += 4 * num_blocks(numel, block_size)
    merged = merged_shape(shape, merge_dims)
    layout = factor_layout(merged, max_size_triangular, min_ndim_triangular, memory_save_mode)
    factors = sum(n * n if triangular else n for n, triangular in zip(merged, layout))
    return momentum + factors * (8 if dtype == torch.float64 else 4) + 4
