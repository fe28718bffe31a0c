"""AdamW and NAdamW on the fused Adam-family step (fastopt.ops.adam_step)."""

from __future__ import annotations

from ..ops import adam_step
from ..state import DEFAULT_BLOCK_SIZE
from .base import FusedOptimizer, check_betas, check_float, split_lr


class AdamW(FusedOptimizer):
    r"""Adam with decoupled weight decay (Loshchilov & Hutter), a drop-in for ``torch.optim.AdamW``.

    With :math:`t` the step, :math:`g` the gradient:

    .. math::
        p \leftarrow p(1 - \eta\lambda), \quad m \leftarrow \beta_1 m + (1-\beta_1) g, \quad
        v \leftarrow \beta_2 v + (1-\beta_2) g^2, \\
        p \leftarrow p - \frac{\eta}{1-\beta_1^t} \cdot \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

    (amsgrad: :math:`\hat v \leftarrow \max(\hat v, v)` replaces :math:`v` in the denominator).

    Takes the whole signature of ``torch.optim.AdamW``; ``foreach``, ``capturable`` and ``fused``
    are accepted and ignored (every backend is fused and keeps ``step`` on the device), and
    ``differentiable=True`` is refused. fastopt's keywords:

    * ``backend``: ``"auto" | "cuda" | "triton" | "cpu" | "torch"`` (env ``FASTOPT_BACKEND``).
    * ``state_dtype``: ``"fp32" | "bf16" | "fp8"`` storage of the moments (fp8: e4m3 codes with
      one fp32 scale per ``block_size`` elements; tensors under 4096 elements stay fp32).
    * ``master_weights``: keep an fp32 copy of bf16/fp16 params and update that.
    * ``stochastic_rounding``: round bf16 params stochastically when writing the update.
    * ``cautious``: Cautious AdamW (Liang et al. 2024): the update :math:`u` (the last term above)
      is applied only where it agrees in sign with the gradient, rescaled by the fraction kept,
      :math:`u \leftarrow u \cdot [u g > 0] / \max(\mathrm{mean}([u g > 0]), 10^{-3})`, the mean over
      each tensor (``c_adamw.py`` of kyleliang919/C-Optim; weight decay is applied as above).
    """

    NESTEROV = False
    MOMENTS = ("exp_avg", "exp_avg_sq")
    SECOND_MOMENTS = frozenset({"exp_avg_sq", "max_exp_avg_sq"})

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 cautious=False, backend=None, state_dtype="fp32", block_size=DEFAULT_BLOCK_SIZE,
                 master_weights=False, stochastic_rounding=False):
        check_float("lr", lr)
        check_float("eps", eps)
        check_float("weight_decay", weight_decay)
        check_betas(betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused, cautious=bool(cautious))
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype, block_size=block_size,
                         master_weights=master_weights, stochastic_rounding=stochastic_rounding)

    def steps_local_shards(self, group) -> bool:
        return not group["cautious"]

    def _moment_names(self, group, p) -> list[str]:
        return [*self.MOMENTS, "max_exp_avg_sq"] if group["amsgrad"] else list(self.MOMENTS)

    def _update(self, backend, group, bucket, grad_scale, found_inf) -> None:
        states, gather = bucket.states, bucket.gather
        lr_tensor, lr = split_lr(group["lr"], bucket.params[0].device)
        beta1, beta2 = (float(b) for b in group["betas"])
        adam_step(backend, bucket.params, bucket.grads, gather("exp_avg"), gather("exp_avg_sq"),
                  gather("max_exp_avg_sq") if group["amsgrad"] else [], gather("exp_avg_scale"),
                  gather("exp_avg_sq_scale"), gather("max_exp_avg_sq_scale") if group["amsgrad"] else [],
                  gather("master_param"), [s["step"] for s in states], lr_tensor, lr, beta1, beta2,
                  float(group["eps"]), float(group["weight_decay"]), self.NESTEROV, bool(group["maximize"]),
                  group["cautious"], self.block_size, self._sr_seed(bucket.params[0].dtype),
                  grad_scale, found_inf)


class NAdamW(AdamW):
    r"""NAdamW as in "Fantastic Pretraining Optimizers" (Wen et al. 2025): optax
    ``scale_by_adam(nesterov=True)`` with decoupled weight decay (Levanter's AdamConfig with
    ``nesterov=True``):

    .. math::
        \hat m = \frac{\beta_1 m_t}{1-\beta_1^{t+1}} + \frac{(1-\beta_1) g_t}{1-\beta_1^t}, \quad
        p \leftarrow p(1-\eta\lambda) - \eta \frac{\hat m}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}

    with :math:`m_t, v_t` AdamW's moments. Same arguments as :class:`AdamW`. (torch.optim.NAdam
    is a different rule: it decays the momentum with a schedule ``mu_t``.)
    """

    NESTEROV = True
