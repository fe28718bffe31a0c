"""Sophia (SophiaG) on the fused element-wise step (fastopt.ops.sophia_step), and the two
diagonal-Hessian estimators that feed it."""

from __future__ import annotations

import torch

from ..ops import sophia_step
from ..state import DEFAULT_BLOCK_SIZE
from .base import FP8, FusedOptimizer, _dtensor_type, check_betas, check_float, split_lr
from .sharding import copy_own_shard_, whole_tensor


class Sophia(FusedOptimizer):
    r"""Sophia (Liu et al. 2023), the SophiaG step of ``Liuhong99/Sophia``:

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g, \quad
        p \leftarrow p(1 - \eta\lambda) - \eta\,\mathrm{sign}(m)\,
            \min\!\Big(\frac{|m|}{\max(\rho \cdot bs \cdot h, 0) + 10^{-15}}, 1\Big)

    and, every k steps (k = 10 in the paper), :meth:`update_hessian`:
    :math:`h \leftarrow \beta_2 h + (1-\beta_2) \hat h`. ``bs`` (tokens per batch, an argument of
    the official ``step()``) is a constructor argument here and may be overridden per step,
    ``opt.step(bs=...)``. The ``max(·, 0)`` is a no-op for the Gauss-Newton-Bartlett estimator
    (``h`` is an EMA of squares: the official update exactly); it turns a negative Hutchinson
    estimate into the clipped step :math:`\eta\,\mathrm{sign}(m)`, as the paper's
    :math:`\max(\gamma h, \epsilon)` does.

    Two estimators of :math:`\hat h`:

    * **Gauss-Newton-Bartlett** (SophiaG, the official default): sample labels from the
      model's own logits, back-propagate the loss on them, then call ``update_hessian()``,
      which folds in :math:`\hat h = g \odot g` of that backward::

          if step % 10 == 0:
              logits = model(x)
              y = torch.distributions.Categorical(logits=logits).sample()
              opt.zero_grad()
              torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
              opt.update_hessian()
          # ... then the usual backward on the real labels and opt.step(bs=tokens_per_batch)

    * **Hutchinson** (Sophia-H, the paper's Levanter version): :math:`\hat h = u \odot (H u)` with
      a Rademacher probe ``u``; :func:`hutchinson_estimates` computes it from a loss whose graph
      was kept, and ``update_hessian(estimates)`` folds it in::

          loss = model_loss(x, y)
          estimates = fastopt.optim.sophia.hutchinson_estimates(loss, params)
          opt.update_hessian(estimates)

    Keywords as :class:`fastopt.AdamW`: ``maximize``, ``backend``, ``state_dtype`` (for ``exp_avg``
    and ``hessian``; fp8 keeps ``h`` signed and linear: an ``h`` far below its block's largest
    only matters through the clip, which it saturates either way), ``block_size``,
    ``master_weights``, ``stochastic_rounding``. The Hessian update runs as plain torch ops (once
    every k steps); the step is fused.
    """

    MOMENTS = ("exp_avg", "hessian")

    def __init__(self, params, lr=2e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1, *, bs=5120,
                 maximize=False, capturable=False, backend=None, state_dtype="fp32", block_size=DEFAULT_BLOCK_SIZE,
                 master_weights=False, stochastic_rounding=False):
        check_float("lr", lr)
        check_float("rho", rho)
        check_float("weight_decay", weight_decay)
        check_betas(betas)
        if not isinstance(bs, (int, float)) or bs <= 0:
            raise ValueError(f"bs (tokens per batch) must be a positive number, got {bs!r}")
        defaults = dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, maximize=maximize,
                        capturable=capturable)
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype, block_size=block_size,
                         master_weights=master_weights, stochastic_rounding=stochastic_rounding)
        self.bs = bs
        self._step_bs = bs

    _OPTIONS = (*FusedOptimizer._OPTIONS, "bs")

    @torch.no_grad()
    def step(self, closure=None, bs=None):
        """One Sophia step; ``bs`` overrides the constructor's tokens per batch for this step."""
        if bs is not None and (not isinstance(bs, (int, float)) or bs <= 0):
            raise ValueError(f"bs (tokens per batch) must be a positive number, got {bs!r}")
        self._step_bs = self.bs if bs is None else bs
        return super().step(closure)

    @torch.no_grad()
    def update_hessian(self, estimates=None) -> None:
        """h ← β2·h + (1−β2)·ĥ for every parameter: ĥ = .grad² (Gauss-Newton-Bartlett; run the
        backward of the sampled-label loss first), or the given ``estimates``, one tensor (or
        None to skip) per parameter in param-group order (e.g. :func:`hutchinson_estimates`)."""
        params = [p for group in self.param_groups for p in group["params"]]
        if estimates is not None:
            estimates = list(estimates)
            if len(estimates) != len(params):
                raise ValueError(f"update_hessian: {len(estimates)} estimates for {len(params)} parameters")
        index, dtensor = 0, _dtensor_type()
        for group in self.param_groups:
            beta2 = float(group["betas"][1])
            for p in group["params"]:
                if estimates is None:
                    estimate = None if p.grad is None else p.grad * p.grad
                else:
                    estimate = estimates[index]
                index += 1
                if estimate is None:
                    continue
                if estimate.shape != p.shape or estimate.device != p.device:
                    raise ValueError(f"update_hessian: an estimate of shape {tuple(estimate.shape)} on "
                                     f"{estimate.device} for a parameter of shape {tuple(p.shape)} on {p.device}")
                state = self._init_state(p, group)
                if isinstance(state["hessian"], dtensor) and state["hessian"].dtype == FP8:
                    # sharded fp8 codes with whole-tensor block scales: the EMA on the whole tensor, codes back
                    view = {**state, "hessian": whole_tensor(state["hessian"])}
                    self._ema_hessian(view, p, whole_tensor(estimate) if isinstance(estimate, dtensor) else estimate,
                                      beta2)
                    copy_own_shard_(state["hessian"], view["hessian"])
                else:
                    self._ema_hessian(state, p, estimate, beta2)

    def _ema_hessian(self, state, p, estimate, beta2) -> None:
        h = self._moment_value(state, "hessian", p)
        self._store_moment(state, "hessian", h.mul_(beta2).add_(estimate.to(h.dtype), alpha=1 - beta2), None)

    def _update(self, backend, group, bucket, grad_scale, found_inf) -> None:
        lr_tensor, lr = split_lr(group["lr"], bucket.params[0].device)
        get = bucket.gather
        sophia_step(backend, bucket.params, bucket.grads, get("exp_avg"), get("hessian"), get("exp_avg_scale"),
                    get("hessian_scale"), get("master_param"), lr_tensor, lr, float(group["betas"][0]),
                    float(group["rho"]), float(self._step_bs), float(group["weight_decay"]), bool(group["maximize"]),
                    self.block_size, self._sr_seed(bucket.params[0].dtype), grad_scale, found_inf)


def hutchinson_estimates(loss: torch.Tensor, params, generator: torch.Generator | None = None) -> list:
    """u ⊙ (H u) per parameter, u a Rademacher probe (±1), H the Hessian of ``loss`` (whose graph
    must be differentiable twice: compute it without ``torch.no_grad``). Parameters that do not
    require grad get None."""
    params = list(params)
    live = [p for p in params if p.requires_grad]
    grads = torch.autograd.grad(loss, live, create_graph=True)
    probes = [torch.randint(0, 2, p.shape, generator=generator, device="cpu").to(device=p.device, dtype=p.dtype)
              .mul_(2).sub_(1) for p in live]
    hvps = torch.autograd.grad(grads, live, grad_outputs=probes)
    by_param = {id(p): (u * hu).detach() for p, u, hu in zip(live, probes, hvps)}
    return [by_param.get(id(p)) for p in params]
