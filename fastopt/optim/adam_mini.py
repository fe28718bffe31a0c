"""Adam-mini on the fused element-wise steps: the blocks with one second moment per segment take
fastopt.ops.adam_mini_step, the full-Adam blocks (embeddings, output layer, biases)
fastopt.ops.adam_step."""

from __future__ import annotations

import torch

from ..ops import adam_mini_step, adam_step
from ..reference.update import compute_dtype
from ..state import DEFAULT_BLOCK_SIZE
from .base import FusedOptimizer, check_betas, check_float, split_lr

# Name patterns (substrings of parameter names), as zyushun/Adam-mini; override per instance.
EMBEDDING_NAMES = ("embed", "embd", "wte", "lm_head", "output.weight")
QUERY_KEY_NAMES = ("q_proj.weight", "k_proj.weight", "wq.weight", "wk.weight")
ROW_NAMES = ("v_proj.weight", "wv.weight", "o_proj.weight", "wo.weight", "attn.proj.weight", "c_proj.weight",
             "feed_forward", "mlp", "linear")
NO_DECAY_NAMES = ("norm", "ln_f")


class AdamMini(FusedOptimizer):
    r"""Adam-mini (Zhang et al. 2024, ``zyushun/Adam-mini`` v1.1): AdamW whose second moment is one
    value per block of parameters, the EMA of the block's mean squared gradient:

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g, \quad
        v_b \leftarrow \beta_2 v_b + (1-\beta_2)\,\mathrm{mean}_{i \in b}(g_i^2), \\
        p \leftarrow p(1 - \eta\lambda) - \frac{\eta}{1-\beta_1^t} \cdot \frac{m}{\sqrt{v_b/(1-\beta_2^t)} + \epsilon}

    Blocks, by parameter name (``named_parameters`` as the official constructor takes it):

    * Q and K (``query_key_names``): one block per head, ``dim·dim / n_heads`` elements (K of a
      grouped-query attention has ``n_kv_heads`` of them);
    * V, the attention output projection and the MLP matrices (``row_names``): one per output row;
    * embeddings and the output layer (``embedding_names``) and biases: full AdamW (``v`` per
      element), as the official code before v1.1; v1.1 gives embeddings one block per token row,
      which ``embedding_names=()`` with their names in ``row_names`` reproduces;
    * norms and every other tensor of fewer than 2 dimensions: one block per tensor.

    A matrix whose name matches no pattern raises ``ValueError`` (pass ``unmatched="tensor"`` to
    give it one block, as the official code does). Norms (``no_decay_names``) get no weight decay.
    The second moments of the blocks are state ``v_mean`` (one fp32 value per block: the point of
    Adam-mini is that this state is small); ``exp_avg`` (and full AdamW's ``exp_avg_sq``) follow
    ``state_dtype``. The per-block means of ``g²`` and the ``v_mean`` EMA run as torch reductions
    over each tensor (one read of the gradient); the update of ``m`` and ``p`` is one fused pass.

    Keywords as :class:`fastopt.AdamW`: ``maximize``, ``backend``, ``state_dtype``, ``block_size``,
    ``master_weights``, ``stochastic_rounding``.
    """

    MOMENTS = ("exp_avg",)
    SECOND_MOMENTS = frozenset({"exp_avg_sq"})
    TAKES_NAMED_PARAMETERS = True  # fastopt.create_optimizer passes model.named_parameters()

    def __init__(self, named_parameters, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, *, dim, n_heads,
                 n_kv_heads=None, embedding_names=EMBEDDING_NAMES, query_key_names=QUERY_KEY_NAMES,
                 row_names=ROW_NAMES, no_decay_names=NO_DECAY_NAMES, unmatched="error", maximize=False,
                 backend=None, state_dtype="fp32", block_size=DEFAULT_BLOCK_SIZE, master_weights=False,
                 stochastic_rounding=False):
        check_float("lr", lr)
        check_float("eps", eps)
        check_float("weight_decay", weight_decay)
        check_betas(betas)
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        for name, value in (("dim", dim), ("n_heads", n_heads), ("n_kv_heads", n_kv_heads)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dim * dim % n_heads or n_heads % n_kv_heads:
            raise ValueError(f"dim·dim ({dim * dim}) must divide into n_heads ({n_heads}) heads, and n_heads into "
                             f"n_kv_heads ({n_kv_heads}) groups")
        if unmatched not in ("error", "tensor"):
            raise ValueError(f"unmatched must be 'error' or 'tensor', got {unmatched!r}")
        head_numel = dim * dim // n_heads
        decay = dict(params=[], segments=[], weight_decay=weight_decay)
        no_decay = dict(params=[], segments=[], weight_decay=0.0)
        unclassified = []
        for item in named_parameters:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                    and isinstance(item[1], torch.Tensor)):
                raise TypeError("AdamMini takes model.named_parameters(): (name, parameter) pairs")
            name, p = item
            if not p.requires_grad:
                continue
            segment = _segment_length(name, p, head_numel, embedding_names, query_key_names, row_names)
            if segment is None:
                if unmatched == "error":
                    unclassified.append(f"{name} {tuple(p.shape)}")
                    continue
                segment = p.numel()
            group = no_decay if any(k in name for k in no_decay_names) else decay
            group["params"].append(p)
            group["segments"].append(segment)
        if unclassified:
            raise ValueError("AdamMini cannot tell which block rule these matrices take: " + ", ".join(unclassified)
                             + ". Add their names to embedding_names (full AdamW), query_key_names (one block per "
                             "head) or row_names (one per output row), or pass unmatched='tensor' (one per tensor)")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize)
        super().__init__([g for g in (decay, no_decay) if g["params"]], defaults, backend=backend,
                         state_dtype=state_dtype, block_size=block_size, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding)

    def add_param_group(self, param_group) -> None:
        if "segments" not in param_group:
            raise TypeError("AdamMini takes its parameters by name at construction (named_parameters); "
                            "add_param_group is not supported")
        super().add_param_group(param_group)

    def _segment(self, p) -> int:
        """Elements per second-moment block of ``p`` (1: full AdamW)."""
        cache = self.__dict__.setdefault("_segment_cache", {})  # by id: rebuilt after a copy or unpickling
        p = self._param_of(p)
        if id(p) not in cache:
            cache.update((id(q), n) for g in self.param_groups for q, n in zip(g["params"], g["segments"]))
        return cache[id(p)]

    def _moment_names(self, group, p) -> list[str]:
        return ["exp_avg", "exp_avg_sq"] if self._segment(p) == 1 else ["exp_avg"]

    def _init_state(self, p, group) -> dict:
        state = super()._init_state(p, group)
        segment = self._segment(p)
        if segment > 1 and "v_mean" not in state:
            state["v_mean"] = torch.zeros(p.numel() // segment, device=p.device, dtype=compute_dtype(p))
        return state

    def _check_saved_state(self, p, saved) -> None:
        super()._check_saved_state(p, saved)
        segment = self._segment(p)
        if segment > 1 and ("v_mean" not in saved or saved["v_mean"].numel() != p.numel() // segment):
            found = tuple(saved["v_mean"].shape) if "v_mean" in saved else "none"
            raise ValueError(f"AdamMini.load_state_dict: a parameter of shape {tuple(p.shape)} needs v_mean of "
                             f"{p.numel() // segment} blocks, the checkpoint has {found}")

    def _convert_state(self, p, group, saved) -> dict:
        state = super()._convert_state(p, group, saved)
        if self._segment(p) > 1:
            state["v_mean"] = saved["v_mean"].to(device=p.device, dtype=compute_dtype(p), copy=True).reshape(-1)
        return state

    def _update(self, backend, group, bucket, grad_scale, found_inf) -> None:
        full, mini = bucket.split(lambda p: self._segment(p) == 1)
        lr_tensor, lr = split_lr(group["lr"], bucket.params[0].device)
        beta1, beta2 = (float(b) for b in group["betas"])
        eps, wd, maximize = float(group["eps"]), float(group["weight_decay"]), bool(group["maximize"])
        sr_seed = self._sr_seed(bucket.params[0].dtype)
        if full.params:
            get = full.gather
            adam_step(backend, full.params, full.grads, get("exp_avg"), get("exp_avg_sq"), [], get("exp_avg_scale"),
                      get("exp_avg_sq_scale"), [], get("master_param"), [s["step"] for s in full.states], lr_tensor,
                      lr, beta1, beta2, eps, wd, False, maximize, False, self.block_size, sr_seed, grad_scale,
                      found_inf)
        if mini.params:
            segments = [self._segment(p) for p in mini.params]
            step_sizes = [self._advance_v_mean(s, g, n, lr_tensor, lr, beta1, beta2, eps, grad_scale, found_inf)
                          for s, g, n in zip(mini.states, mini.grads, segments)]
            get = mini.gather
            adam_mini_step(backend, mini.params, mini.grads, get("exp_avg"), get("exp_avg_scale"), step_sizes,
                           segments, get("master_param"), lr_tensor, lr, beta1, wd, maximize, self.block_size,
                           sr_seed, grad_scale, found_inf)

    @staticmethod
    def _advance_v_mean(state, grad, segment, lr_tensor, lr, beta1, beta2, eps, grad_scale, found_inf):
        """v_b ← β2·v_b + (1-β2)·mean_b(g²) (kept when found_inf is set, decided on the device); returns the
        blocks' step sizes lr/(1-β1^t) / (√(v_b/(1-β2^t)) + eps) in fp32 (fp64 for fp64 params)."""
        v = state["v_mean"]
        g = grad.reshape(-1, segment).to(v.dtype)
        if grad_scale is not None:
            g = g / grad_scale.to(v.dtype)
        new_v = v * beta2 + torch.linalg.vector_norm(g, dim=1).square() * ((1 - beta2) / segment)
        v.copy_(new_v if found_inf is None else torch.where(found_inf.to(torch.bool), v, new_v))
        t = state["step"].to(v.dtype)
        lr_value = lr_tensor.to(v.dtype) if lr_tensor is not None else lr
        return lr_value / (1 - beta1 ** t) / (v.sqrt() / (1 - beta2 ** t).sqrt() + eps)


def _segment_length(name, p, head_numel, embedding_names, query_key_names, row_names):
    """Elements per second-moment block of parameter ``name`` (1: full AdamW), or None if unclassified."""
    if any(k in name for k in embedding_names) or (p.ndim == 1 and name.endswith("bias")):
        return 1
    if p.ndim < 2:
        return p.numel()
    if any(k in name for k in query_key_names):
        if p.numel() % head_numel:
            raise ValueError(f"AdamMini: {name} {tuple(p.shape)} does not split into heads of {head_numel} "
                             "elements (dim·dim / n_heads)")
        return head_numel
    if any(k in name for k in row_names):
        return p[0].numel()
    return None
