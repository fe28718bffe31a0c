"""Lion on the fused element-wise step (fastopt.ops.lion_step)."""

from __future__ import annotations

from ..ops import lion_step
from ..state import DEFAULT_BLOCK_SIZE
from .base import FusedOptimizer, check_betas, check_float, split_lr


class Lion(FusedOptimizer):
    r"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"); defaults and
    state (``exp_avg``) as ``lucidrains/lion-pytorch``:

    .. math::
        u = \eta\,\mathrm{sign}(\beta_1 m + (1-\beta_1) g), \quad
        p \leftarrow p(1 - \eta\lambda) - u, \quad m \leftarrow \beta_2 m + (1-\beta_2) g

    Keywords as :class:`fastopt.AdamW`: ``maximize``, ``cautious`` (C-Optim's cautious Lion:
    :math:`u \leftarrow u \cdot [u g > 0] / \max(\mathrm{mean}([u g > 0]), 10^{-3})` per tensor),
    ``backend``, ``state_dtype``, ``block_size``, ``master_weights``, ``stochastic_rounding``.
    Lion's updates have the size of ``lr`` in every coordinate: take lr 3-10x smaller and weight
    decay 3-10x larger than for AdamW.
    """

    MOMENTS = ("exp_avg",)
    STEP_IN_CHECKPOINT = False  # lion-pytorch keeps no step count

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False, cautious=False,
                 backend=None, state_dtype="fp32", block_size=DEFAULT_BLOCK_SIZE, master_weights=False,
                 stochastic_rounding=False):
        check_float("lr", lr)
        check_float("weight_decay", weight_decay)
        check_betas(betas)
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize, cautious=bool(cautious))
        super().__init__(params, defaults, backend=backend, state_dtype=state_dtype, block_size=block_size,
                         master_weights=master_weights, stochastic_rounding=stochastic_rounding)

    def steps_local_shards(self, group) -> bool:
        return not group["cautious"]

    def _update(self, backend, group, bucket, grad_scale, found_inf) -> None:
        lr_tensor, lr = split_lr(group["lr"], bucket.params[0].device)
        beta1, beta2 = (float(b) for b in group["betas"])
        lion_step(backend, bucket.params, bucket.grads, bucket.gather("exp_avg"), bucket.gather("exp_avg_scale"),
                  bucket.gather("master_param"), lr_tensor, lr, beta1, beta2, float(group["weight_decay"]),
                  bool(group["maximize"]), group["cautious"], self.block_size, self._sr_seed(bucket.params[0].dtype),
                  grad_scale, found_inf)
