"""SOAP: Adam in the eigenbasis of Shampoo's Kronecker factors, the factors on fastopt.ops.kron_factor_update."""

from __future__ import annotations

import torch

from ..ops import kron_factor_update
from ..reference.soap import WorkBuffers, merged_shape, project, soap_step, update_factors
from ..reference.update import compute_dtype
from ..state import DEFAULT_BLOCK_SIZE
from .base import FusedOptimizer, check_betas, check_float


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
    The first moment is kept projected, as ``exp_avg_projected`` = :math:`Q_L^\top m Q_R` (updated from the
    projected gradient, which the step computes anyway; re-projected at each refresh): one projection fewer
    per step than the official code, the same update up to rounding. An official-layout checkpoint
    (``exp_avg`` in the original space) loads, projected into its saved bases.
    The math is fastopt.reference.soap (the ``torch`` backend runs it as it is); on the ``cpu`` and
    ``triton`` backends the factor EMA of a matrix runs on fastopt.ops.kron_factor_update (one triangle,
    the EMA fused). The moments m and v are kept in ``state_dtype`` (fp32, bf16, or fp8 with v as its
    square root; each step decodes them, runs the reference, and re-encodes, so the refresh's permutation
    of v needs no bookkeeping); the factors and bases stay fp32. ``merge_dims`` views a tensor of 2+
    dimensions as the official ``merged_shape`` (e.g. a (64, 3, 3, 3) conv weight as (64, 27)).
    ``torch.amp.GradScaler`` works through its unscale-then-step path. A dimension above ``max_precond_dim``
    gets no factor: a (50257, 768) embedding keeps one 768×768 factor, never a 50257² one. An ``eigh`` that
    fails in float32 is redone in float64, warned and counted (:meth:`eigh_fallbacks`).
    ``partition_block_size`` b (Levanter's ``partition_grads_into_blocks`` / ``block_size``; ``block_size`` here is
    the fp8 state's) cuts every preconditioned dimension above b into chunks of b and runs each block of the chunk
    grid as its own SOAP tensor (the blocks of one shape as one batch): factors and bases of at most b×b per block,
    8 + 16 bytes per parameter of a full block in fp32 whatever the matrix's size.
    """

    MOMENTS = ("exp_avg_projected", "exp_avg_sq")  # the first moment kept in the eigenbasis (see below)
    SECOND_MOMENTS = frozenset({"exp_avg_sq"})  # fp8: kept as square roots, like AdamW's
    _step_supports_amp_scaling = False  # GradScaler unscales the grads and skips inf steps itself

    def __init__(self, params, lr=3e-3, betas=(0.95, 0.95), shampoo_beta=None, eps=1e-8, weight_decay=0.01,
                 precondition_frequency=10, max_precond_dim=10000, merge_dims=False, precondition_1d=False,
                 normalize_grads=False, correct_bias=True, *, partition_block_size=None, backend=None,
                 state_dtype="fp32", block_size=DEFAULT_BLOCK_SIZE):
        check_float("lr", lr)
        check_betas(betas)
        if shampoo_beta is not None:
            check_float("shampoo_beta", shampoo_beta, 0.0, 1.0, high_open=True)
        check_float("eps", eps)
        check_float("weight_decay", weight_decay)
        for name, value in (("precondition_frequency", precondition_frequency), ("max_precond_dim", max_precond_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        blocks = partition_block_size
        if blocks is not None and (isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1):
            raise ValueError(f"partition_block_size must be None or a positive int, got {partition_block_size!r}")
        defaults = dict(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
                        precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
                        merge_dims=bool(merge_dims), precondition_1d=bool(precondition_1d),
                        normalize_grads=bool(normalize_grads), correct_bias=bool(correct_bias),
                        partition_block_size=partition_block_size)
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype, block_size=block_size)

    def _update(self, backend, group, bucket, grad_scale, found_inf) -> None:
        options = {k: group[k] for k in ("lr", "betas", "shampoo_beta", "eps", "weight_decay", "precondition_frequency",
                                         "max_precond_dim", "merge_dims", "precondition_1d", "normalize_grads",
                                         "correct_bias", "partition_block_size")}
        options["lr"] = float(options["lr"])
        factor_update = update_factors if backend == "torch" else _factor_kernel(backend)
        buffers = WorkBuffers()  # the rotations' results, reused from tensor to tensor of the bucket
        for p, g, state in zip(bucket.params, bucket.grads, bucket.states):
            # bf16 / fp8 moments: the step runs on float copies, stored back (re-quantised: the refresh's
            # permutation of v needs no block bookkeeping)
            stored = [n for n in self.MOMENTS if state[n].dtype != compute_dtype(p)]
            view = {**state, **{n: self._moment_value(state, n, p) for n in stored}}
            # the call's number decides the refresh on the host (one read of the device counter per tensor)
            soap_step(p, g, view, int(state["step"]), projected_momentum=True, factor_update=factor_update,
                      buffers=buffers, **options)
            state.update({k: view[k] for k in ("GG", "Q", "blocks", "eigh_fallbacks") if k in view})
            for n in self.MOMENTS:
                if n in stored:
                    self._store_moment(state, n, view[n], None)
                else:
                    state[n] = view[n]

    def _check_saved_state(self, p, saved: dict) -> None:
        if _official_layout(saved):
            saved = {**saved, "exp_avg_projected": saved["exp_avg"]}
        super()._check_saved_state(p, saved)
        if "GG" in saved and "blocks" in saved:
            raise ValueError("SOAP.load_state_dict: a state with both whole-tensor factors (GG) and blocks")

    def _convert_state(self, p, group, saved: dict) -> dict:
        if _official_layout(saved):  # m in the original space: projected into the saved bases
            saved = {**saved, "exp_avg_projected": _project_saved(p, saved["exp_avg"], saved["Q"], group)}
        state = super()._convert_state(p, group, saved)
        partitioned = group["partition_block_size"] is not None
        if ("blocks" in saved and not partitioned) or ("GG" in saved and partitioned):
            raise ValueError(f"SOAP.load_state_dict: a checkpoint {'with' if 'blocks' in saved else 'without'} "
                             f"partition blocks for an optimizer with partition_block_size="
                             f"{group['partition_block_size']}")
        def factors(ts):
            return [None if t is None else t.to(device=p.device, dtype=compute_dtype(p), copy=True) for t in ts]

        for key in ("GG", "Q"):
            if key in saved:
                state[key] = factors(saved[key])
        if "blocks" in saved:
            state["blocks"] = [{k: factors(b[k]) for k in ("GG", "Q") if k in b} for b in saved["blocks"]]
        if "eigh_fallbacks" in saved:
            state["eigh_fallbacks"] = int(saved["eigh_fallbacks"])
        return state

    def eigh_fallbacks(self) -> int:
        """How many factors' first eigendecomposition failed in float32 and was redone in float64 (each also
        warned), over every parameter: a count for monitoring, checkpointed with the state."""
        return sum(state.get("eigh_fallbacks", 0) for state in self.state.values())


def _official_layout(saved: dict) -> bool:
    return "exp_avg" in saved and "exp_avg_projected" not in saved and "Q" in saved


def _project_saved(p, exp_avg: torch.Tensor, bases: list, group) -> torch.Tensor:
    """An official-layout first moment in the eigenbasis: the saved bases (per merged dimension with merge_dims)."""
    merged = group["merge_dims"] and exp_avg.ndim > 1
    shape = merged_shape(exp_avg.shape, group["max_precond_dim"]) if merged else exp_avg.shape
    dtype = compute_dtype(p)
    bases = [None if q is None else q.to(p.device, dtype) for q in bases]
    return project(exp_avg.to(p.device, dtype).reshape(shape), bases).reshape(exp_avg.shape)


def _factor_kernel(backend: str):
    """The factor EMA on fastopt.ops.kron_factor_update for a batch of matrices (B, m, n), the reference contraction
    otherwise."""
    def update(grad, factors, shampoo_beta):
        if grad.ndim == 3:
            kron_factor_update(factors[0], factors[1], grad, shampoo_beta, backend=backend)
        else:
            update_factors(grad, factors, shampoo_beta)
    return update
