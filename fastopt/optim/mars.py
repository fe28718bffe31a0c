"""MARS-AdamW on the fused element-wise steps: matrices take fastopt.ops.mars_step, vectors
(unless ``optimize_1d``) fastopt.ops.adam_step."""

from __future__ import annotations

import torch

from ..ops import adam_step, mars_step
from ..state import DEFAULT_BLOCK_SIZE
from .base import FusedOptimizer, check_betas, check_float, split_lr


class MARS(FusedOptimizer):
    r"""MARS-AdamW (Yuan et al. 2025, "MARS: Unleashing the Power of Variance Reduction for Training
    Large Models"), the ``mars-adamw`` form of ``AGI-Arena/MARS`` that "Fantastic Pretraining
    Optimizers" (Wen et al. 2025) benchmarks. With :math:`g_{t-1}` the previous step's gradient:

    .. math::
        c = g_t + \gamma \frac{\beta_1}{1-\beta_1} (g_t - g_{t-1}), \quad
        c \leftarrow c / \max(\lVert c \rVert_2, 1) \text{ (per tensor)}, \\
        m \leftarrow \beta_1 m + (1-\beta_1) c, \quad v \leftarrow \beta_2 v + (1-\beta_2) c^2, \quad
        p \leftarrow p(1 - \eta\lambda)
            - \frac{\eta}{1-\beta_1^t} \cdot \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

    The norm is computed on the device by a first pass of the fused kernel (no host sync).
    Parameters with fewer than two dimensions take plain AdamW with ``betas_1d``,
    ``weight_decay_1d`` and learning rate ``lr · lr_1d / lr_init`` (``lr_init``: the constructor's
    ``lr``, so schedules scale both), unless ``optimize_1d=True``; ``amsgrad`` as in AdamW.

    Where this differs from the official code, it follows the paper:

    * tensors with three or more dimensions take MARS (the official code sends every tensor
      that is not exactly 2-D to AdamW);
    * ``g_{t-1}`` is a copy of the gradient (the official code keeps a reference to ``p.grad``,
      which ``zero_grad(set_to_none=False)`` then zeroes in place, silently turning the correction off).

    ``is_approx=True`` (default) uses the previous step's gradient for :math:`g_{t-1}`. With
    ``is_approx=False`` (exact MARS), compute :math:`\nabla f(x_{t-1}, \xi_t)` into ``.grad``
    and call :meth:`update_last_grad` before each step; ``step()`` refuses to run otherwise.

    Keywords as :class:`fastopt.AdamW`: ``maximize``, ``cautious`` (the mask compares the update
    with the raw gradient, as pytorch-optimizer's MARS), ``backend``, ``state_dtype`` (also for
    the stored gradient ``last_grad``), ``block_size``, ``master_weights``, ``stochastic_rounding``.
    """

    MOMENTS = ("exp_avg", "exp_avg_sq")
    SECOND_MOMENTS = frozenset({"exp_avg_sq", "max_exp_avg_sq"})
    ROLE_OPTIONS = {"vector": {"weight_decay": 0.0, "weight_decay_1d": 0.0}}

    def __init__(self, params, lr=3e-3, betas=(0.95, 0.99), eps=1e-8, weight_decay=0.0, amsgrad=False, gamma=0.025,
                 is_approx=True, mars_type="mars-adamw", optimize_1d=False, lr_1d=3e-3, betas_1d=(0.9, 0.95),
                 weight_decay_1d=0.1, *, maximize=False, cautious=False, backend=None, state_dtype="fp32",
                 block_size=DEFAULT_BLOCK_SIZE, master_weights=False, stochastic_rounding=False):
        if mars_type != "mars-adamw":
            raise ValueError(f"fastopt.MARS implements mars_type='mars-adamw' only, got {mars_type!r}")
        for name, value in (("lr", lr), ("lr_1d", lr_1d), ("eps", eps), ("weight_decay", weight_decay),
                            ("weight_decay_1d", weight_decay_1d), ("gamma", gamma)):
            check_float(name, value)
        check_betas(betas)
        check_betas(betas_1d)
        if float(lr) == 0.0 and float(lr_1d) != 0.0:
            raise ValueError("lr_1d is relative to lr (lr_1d / lr scales the 1-D learning rate): lr must not be 0")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=bool(amsgrad), gamma=gamma,
                        is_approx=bool(is_approx), optimize_1d=bool(optimize_1d),
                        lr_1d_factor=float(lr_1d) / float(lr) if float(lr) else 0.0, betas_1d=betas_1d,
                        weight_decay_1d=weight_decay_1d, maximize=maximize, cautious=bool(cautious))
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype, block_size=block_size,
                         master_weights=master_weights, stochastic_rounding=stochastic_rounding)
        self._last_grads_given = False

    @staticmethod
    def _takes_mars(group, p: torch.Tensor) -> bool:
        return group["optimize_1d"] or p.ndim >= 2

    def _moment_names(self, group, p) -> list[str]:
        names = [*self.MOMENTS, "max_exp_avg_sq"] if group["amsgrad"] else list(self.MOMENTS)
        return [*names, "last_grad"] if self._takes_mars(group, p) else names

    @torch.no_grad()
    def update_last_grad(self) -> None:
        """Exact MARS (``is_approx=False``): store the current ``.grad`` — the gradient at the
        previous parameters on the coming step's batch, unscaled — as :math:`g_{t-1}`."""
        for group in self.param_groups:
            if group["is_approx"]:
                raise RuntimeError("update_last_grad() is for is_approx=False; with is_approx=True the previous "
                                   "step's gradient is stored by step()")
            for p in group["params"]:
                if p.grad is None or not self._takes_mars(group, p):
                    continue
                self._check_param(p, p.grad)
                state = self._init_state(p, group)
                grad = -p.grad if group["maximize"] else p.grad
                self._store_moment(state, "last_grad", grad.float() if p.dtype != torch.float64 else grad, None)
        self._last_grads_given = True

    @torch.no_grad()
    def step(self, closure=None):
        if not self._last_grads_given and not all(g["is_approx"] for g in self.param_groups):
            raise RuntimeError("MARS(is_approx=False): call update_last_grad() with the gradient at the previous "
                               "parameters before each step()")
        self._last_grads_given = False
        return super().step(closure)

    def _update(self, backend, group, bucket, grad_scale, found_inf) -> None:
        matrices, vectors = bucket.split(lambda p: self._takes_mars(group, p))
        amsgrad, device = group["amsgrad"], bucket.params[0].device
        sr_seed = self._sr_seed(bucket.params[0].dtype)
        if matrices.params:
            get = matrices.gather
            lr_tensor, lr = split_lr(group["lr"], device)
            beta1, beta2 = (float(b) for b in group["betas"])
            mars_step(backend, matrices.params, matrices.grads, get("exp_avg"), get("exp_avg_sq"),
                      get("max_exp_avg_sq") if amsgrad else [], get("last_grad"), get("exp_avg_scale"),
                      get("exp_avg_sq_scale"), get("max_exp_avg_sq_scale") if amsgrad else [],
                      get("last_grad_scale"), get("master_param"), [s["step"] for s in matrices.states], lr_tensor,
                      lr, beta1, beta2, float(group["eps"]), float(group["weight_decay"]), float(group["gamma"]),
                      bool(group["maximize"]), group["cautious"], self.block_size, sr_seed, grad_scale, found_inf)
        if vectors.params:
            get = vectors.gather
            lr_tensor, lr = split_lr(group["lr"] * group["lr_1d_factor"], device)
            beta1, beta2 = (float(b) for b in group["betas_1d"])
            adam_step(backend, vectors.params, vectors.grads, get("exp_avg"), get("exp_avg_sq"),
                      get("max_exp_avg_sq") if amsgrad else [], get("exp_avg_scale"), get("exp_avg_sq_scale"),
                      get("max_exp_avg_sq_scale") if amsgrad else [], get("master_param"),
                      [s["step"] for s in vectors.states], lr_tensor, lr, beta1, beta2, float(group["eps"]),
                      float(group["weight_decay_1d"]), False, bool(group["maximize"]), group["cautious"],
                      self.block_size, sr_seed, grad_scale, found_inf)
