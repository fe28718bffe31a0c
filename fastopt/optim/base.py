"""FusedOptimizer: what every fastopt optimizer shares.

* argument checks with messages that name the argument;
* parameter bucketing: ``step()`` gathers the params that have grads and groups them by
  (device, param dtype, state storage dtype) so each bucket is one kernel launch;
* the backend choice per bucket (fastopt.backends) and the state storage dtype
  (fastopt.state), including conversion of loaded checkpoints between storage formats;
* AMP: ``grad_scale`` / ``found_inf`` set by ``torch.amp.GradScaler`` are honoured
  (``_step_supports_amp_scaling``), as in torch's fused optimizers;
* sharded parameters (FSDP2's DTensors, their moments sharded alike): where ``steps_local_shards``, the bucket
  holds each rank's local shards and ``Bucket.sharded`` the DTensor parameters (Muon, ROOT and Scion gather whole
  matrices from them); otherwise every rank steps the whole tensors (``_update_whole``; fastopt.optim.sharding).

A subclass names its moments (``MOMENTS``, always present; ``_moment_names(group, p)`` may add
optional ones, per group or per parameter; ``SECOND_MOMENTS`` are kept as square roots in fp8) and implements
``_update(backend, group, bucket, grad_scale, found_inf)``.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch.optim import Optimizer

from .. import backends
from ..reference.moments import load
from ..reference.update import compute_dtype
from ..state import (DEFAULT_BLOCK_SIZE, check_block_size, dequantize_e4m3, num_blocks, parse_state_dtype,
                     quantize_e4m3, storage_dtype_for)
from .sharding import copy_own_shard_, whole_tensor

FP8 = torch.float8_e4m3fn
_FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_STRIDED = torch.strided


class _E4M3Codes(NamedTuple):
    codes: torch.Tensor  # uint8 view of float8_e4m3fn codes, for pickling


@dataclass
class Bucket:
    """The tensors of one kernel launch: same device, param dtype and storage dtype."""

    params: list = field(default_factory=list)
    grads: list = field(default_factory=list)
    states: list = field(default_factory=list)
    sharded: list = field(default_factory=list)  # each DTensor param (params, grads, states: its local shard) or None

    def gather(self, name: str) -> list:
        """The state tensor ``name`` of every param, or [] if the bucket's state has none."""
        return [s[name] for s in self.states] if name in self.states[0] else []

    def split(self, keep) -> tuple[Bucket, Bucket]:
        """(the params p with keep(p), the others), each with its grads and states."""
        kept, rest = Bucket(), Bucket()
        for p, g, s, d in zip(self.params, self.grads, self.states, self.sharded):
            part = kept if keep(p) else rest
            part.params.append(p)
            part.grads.append(g)
            part.states.append(s)
            part.sharded.append(d)
        return kept, rest


def check_float(name: str, value, low: float = 0.0, high: float = math.inf, high_open: bool = False) -> None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} as a tensor must have one element, got shape {tuple(value.shape)}")
        value = float(value.detach().cpu())
    if not isinstance(value, (int, float)) or math.isnan(value) or value < low or value > high or (
            high_open and value == high):
        bound = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ValueError(f"invalid {name}: {value!r} (must be a number in {bound})")


def check_betas(betas) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        check_float(f"beta{i + 1}", beta, 0.0, 1.0, high_open=True)


class FusedOptimizer(Optimizer):
    MOMENTS: tuple[str, ...] = ()
    STEP_IN_CHECKPOINT = True  # False: the rule ignores step counts (Lion); a checkpoint may lack them
    SECOND_MOMENTS: frozenset[str] = frozenset()
    ROLE_OPTIONS: dict = {"vector": {"weight_decay": 0.0}}  # group options per role (fastopt.create_optimizer)
    GPU_ORDER = ("cuda", "triton")  # the engines backend="auto" tries on CUDA tensors, fastest first (measured)
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults, *, backend=None, state_dtype="fp32", block_size=DEFAULT_BLOCK_SIZE,
                 master_weights=False, stochastic_rounding=False):
        self.backend = backends.check_backend(backend or backends.default_backend())
        self.state_dtype = state_dtype
        self._state_torch_dtype = parse_state_dtype(state_dtype)
        self.block_size = check_block_size(block_size)
        if master_weights and stochastic_rounding:
            raise ValueError("master_weights and stochastic_rounding are alternatives: choose one")
        self.master_weights = bool(master_weights)
        self.stochastic_rounding = bool(stochastic_rounding)
        self._sr_steps = 0
        if defaults.get("differentiable"):
            raise ValueError("fastopt optimizers are not differentiable (differentiable=True is not supported)")
        super().__init__(params, defaults)
        backends.require(self.backend)

    _OPTIONS = ("backend", "state_dtype", "block_size", "master_weights", "stochastic_rounding", "_sr_steps")

    def __getstate__(self):
        # torch's keeps only defaults, state and param_groups; and pickle cannot serialise float8
        # tensors (torch 2.14), so fp8 codes travel as uint8 views
        state = super().__getstate__()
        state["state"] = {p: {k: _E4M3Codes(v.view(torch.uint8)) if isinstance(v, torch.Tensor) and v.dtype == FP8
                              else v for k, v in s.items()} for p, s in state["state"].items()}
        return {**state, "fastopt_options": {k: getattr(self, k) for k in self._OPTIONS}}

    def __setstate__(self, state):
        options = state.pop("fastopt_options", None)  # None: from Optimizer.load_state_dict
        if options is not None:
            state["state"] = defaultdict(dict, {p: {k: v.codes.view(FP8) if isinstance(v, _E4M3Codes) else v
                                                    for k, v in s.items()} for p, s in state["state"].items()})
        super().__setstate__(state)
        if options is not None:
            self.__dict__.update(options)
            self._state_torch_dtype = parse_state_dtype(self.state_dtype)

    # ---- state ---------------------------------------------------------------------------

    def _moment_names(self, group, p: torch.Tensor) -> list[str]:
        return list(self.MOMENTS)

    def _new_moment(self, p: torch.Tensor, state: dict, name: str) -> None:
        dtype = storage_dtype_for(p, self._state_torch_dtype)
        state[name] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
        if dtype == FP8:
            state[name + "_scale"] = torch.zeros(num_blocks(p.numel(), self.block_size), device=p.device)

    def _init_state(self, p: torch.Tensor, group) -> dict:
        state = self.state[p]
        names = self._moment_names(group, p)
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            for name in names:
                self._new_moment(p, state, name)
            if self.master_weights and p.dtype in (torch.bfloat16, torch.float16):
                state["master_param"] = p.detach().float()
        else:
            for name in names:  # e.g. amsgrad switched on after a checkpoint
                if name not in state:
                    self._new_moment(p, state, name)
        return state

    def state_bytes(self) -> int:
        """Bytes held in optimizer state (moments, scales, steps, master weights, SOAP's factor lists)."""
        return sum(tensor_bytes(s) for s in self.state.values())

    # ---- step ----------------------------------------------------------------------------

    def _check_param(self, p: torch.Tensor, g: torch.Tensor) -> None:
        if g.layout is _STRIDED and g.dtype is p.dtype and p.dtype in _FLOAT_DTYPES and g.shape == p.shape \
                and g.device == p.device:
            return  # the common case, in the fewest calls into torch: a step checks every parameter
        if g.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        if p.is_complex():
            raise TypeError(f"{type(self).__name__} does not support complex parameters; "
                            "optimize torch.view_as_real(param) instead")
        if not p.is_floating_point():
            raise TypeError(f"{type(self).__name__} needs floating-point parameters, got {p.dtype}")
        if g.dtype != p.dtype or g.device != p.device or g.shape != p.shape:
            raise ValueError(f"grad ({g.dtype}, {g.device}, {tuple(g.shape)}) does not match its parameter "
                             f"({p.dtype}, {p.device}, {tuple(p.shape)})")

    def steps_local_shards(self, group) -> bool:
        """Whether ``group``'s step takes a sharded (DTensor) parameter as its local shard, with its moments' shards:
        an element-wise rule, or one that gathers what it needs itself (Muon, ROOT, Scion: fastopt.optim.sharding).
        Otherwise (and for fp8 state, whose block scales cover the whole tensor) every rank takes the whole
        tensor's step (``_update_whole``)."""
        return False

    def _buckets(self, group) -> dict:
        """The params with grads by (device, param dtype, storage dtype, whole-tensor step of a sharded param)."""
        buckets = {}
        dtensor = _dtensor_type()
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            self._check_param(p, g)
            sharded = p if dtensor is not None and isinstance(p, dtensor) else None
            if sharded is not None and (not isinstance(g, dtensor) or g.placements != p.placements
                                        or g.device_mesh != p.device_mesh):
                raise ValueError(f"{type(self).__name__}: the grad of the DTensor parameter of shape {tuple(p.shape)} "
                                 f"({p.placements}) is {getattr(g, 'placements', 'a plain tensor')}: it must be "
                                 "sharded like its parameter")
            state = self._init_state(p, group)
            whole = sharded is not None and (not self.steps_local_shards(group) or any(
                isinstance(v, torch.Tensor) and v.dtype == FP8 for v in state.values()))
            if sharded is not None and not whole:  # the local shards (views: the kernels write through them)
                p, g = p.to_local(), g.to_local()
                state = {k: v.to_local() if isinstance(v, dtensor) else v for k, v in state.items()}
            key = (p.device, p.dtype, state[self._moment_names(group, p)[0]].dtype, whole)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = Bucket()
            bucket.params.append(p)
            bucket.grads.append(g if g.is_contiguous() else g.contiguous())
            bucket.states.append(state)
            bucket.sharded.append(sharded)
        return buckets

    def _sr_seed(self, param_dtype: torch.dtype) -> int:
        return self._sr_steps & 0x7FFFFFFF if self.stochastic_rounding and param_dtype == torch.bfloat16 else -1

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        self._sr_steps += 1
        for group in self.param_groups:
            for (device, dtype, _, whole), bucket in self._buckets(group).items():
                backend = backends.select(self.backend, device, dtype, self.GPU_ORDER)
                scale_here, inf_here = _float32_on(grad_scale, device), _float32_on(found_inf, device)
                steps = [s["step"] for s in bucket.states]
                if backend == "cpu":  # one C++ loop: torch._foreach_add_ dispatches per CPU tensor
                    torch.ops.fastopt.advance_steps_(steps, 1.0)
                else:
                    torch._foreach_add_(steps, 1)
                (self._update_whole if whole else self._update)(backend, group, bucket, scale_here, inf_here)
                if inf_here is not None:  # a skipped step does not count, as in torch's fused optimizers
                    torch._foreach_sub_(steps, [inf_here] * len(steps))
        return loss

    def _update(self, backend, group, bucket, grad_scale, found_inf) -> None:
        raise NotImplementedError

    def _update_whole(self, backend, group, bucket, grad_scale, found_inf) -> None:
        """The step of sharded (DTensor) parameters whose rule needs whole tensors, one parameter at a time: it,
        its grad and its sharded state all-gathered, ``_update`` on those whole tensors on every rank (the same
        result on each: the one-process step), each rank's shards written back; the state that is not a DTensor
        (factors, fp8 scales, counters) is whole and the same on every rank."""
        dtensor = _dtensor_type()
        for p, g, state in zip(bucket.params, bucket.grads, bucket.states):
            whole_p = whole_tensor(p)
            whole_state = {k: whole_tensor(v) if isinstance(v, dtensor) else v for k, v in state.items()}
            self._whole_copies = {id(whole_p): p}
            try:
                self._update(backend, group, Bucket([whole_p], [whole_tensor(g)], [whole_state], [None]), grad_scale,
                             found_inf)
            finally:
                self._whole_copies = {}
            copy_own_shard_(p, whole_p)
            for k, v in whole_state.items():
                if isinstance(state.get(k), dtensor):
                    copy_own_shard_(state[k], v)
                else:
                    state[k] = v

    def _param_of(self, p: torch.Tensor) -> torch.Tensor:
        """The optimizer's parameter for a tensor ``_update`` sees: itself, or the sharded parameter that
        ``_update_whole`` passed whole."""
        return self.__dict__.get("_whole_copies", {}).get(id(p), p)

    # ---- checkpoints -----------------------------------------------------------------------

    def load_state_dict(self, state_dict) -> None:
        """Load a fastopt or torch.optim checkpoint; moments are converted to this optimizer's
        storage dtype (fp32 ↔ bf16 ↔ fp8); same-format fp8 state is copied bit for bit.
        The checkpoint is checked whole before anything is loaded."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        raw = {k: dict(v) for k, v in state_dict["state"].items()}
        for saved_id, p in zip(saved_ids, params):
            if saved_id in raw:
                self._check_saved_state(p, raw[saved_id])
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # a torch.optim checkpoint lacks fastopt's group keys
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        groups = [g for g in self.param_groups for _ in g["params"]]
        for saved_id, p, group in zip(saved_ids, params, groups):
            if saved_id in raw:
                self.state[p] = self._convert_state(p, group, raw[saved_id])

    def _check_saved_state(self, p: torch.Tensor, saved: dict) -> None:
        name = type(self).__name__
        required = ("step", *self.MOMENTS) if self.STEP_IN_CHECKPOINT else self.MOMENTS
        missing = [n for n in required if n not in saved]
        if missing:
            raise ValueError(f"{name}.load_state_dict: the state of a parameter of shape {tuple(p.shape)} has "
                             f"keys {sorted(saved)}, missing {missing}: a checkpoint of another optimizer?")
        for key, value in saved.items():
            if key in self.MOMENTS or key in self.SECOND_MOMENTS:
                if tuple(value.shape) != tuple(p.shape):
                    raise ValueError(f"{name}.load_state_dict: {key} has shape {tuple(value.shape)}, its parameter "
                                     f"{tuple(p.shape)}")
                if value.dtype == FP8 and key + "_scale" not in saved:
                    raise ValueError(f"{name}.load_state_dict: {key} is float8 codes without {key}_scale")

    def _convert_state(self, p: torch.Tensor, group, saved: dict) -> dict:
        # fresh tensors: a live optimizer's state_dict must not end up shared with this one
        step = saved.get("step", 0.0)
        state = {"step": torch.as_tensor(step, dtype=torch.float32, device=p.device).clone().reshape(())}
        for name in self._moment_names(group, p):
            self._new_moment(p, state, name)
            if name in saved:
                scale = saved.get(name + "_scale")
                self._store_moment(state, name, saved[name].to(p.device), None if scale is None else scale.to(p.device))
        if "master_param" in saved:
            state["master_param"] = saved["master_param"].to(device=p.device, dtype=torch.float32, copy=True)
        elif self.master_weights and p.dtype in (torch.bfloat16, torch.float16):
            state["master_param"] = p.detach().float()
        return state

    def _moment_value(self, state, name, p) -> torch.Tensor:
        """The moment ``name`` of ``p`` in the compute dtype (float32, float64 for float64 params)."""
        return load(state[name], state.get(name + "_scale"), self.block_size, compute_dtype(p),
                    squared=name in self.SECOND_MOMENTS)

    def _store_moment(self, state, name, value, scale) -> None:
        squared = name in self.SECOND_MOMENTS
        target = state[name]
        if value.dtype == FP8:
            block = _block_size_of(value.numel(), scale.numel())
            if target.dtype == FP8 and block == self.block_size:
                target.copy_(value)
                state[name + "_scale"].copy_(scale)
                return
            value = dequantize_e4m3(value, scale, block)
            value = value * value if squared else value
        if target.dtype == FP8:
            codes, scales = quantize_e4m3(value.float().sqrt() if squared else value.float(), self.block_size)
            target.copy_(codes)
            state[name + "_scale"].copy_(scales)
        else:
            target.copy_(value)


def _dtensor_type() -> type | None:
    """torch's DTensor class, if torch.distributed.tensor was imported (there are no DTensors otherwise: importing
    it here would cost every step-less import of fastopt ~0.4 s)."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def tensor_bytes(value) -> int:
    """Bytes of the tensors in a state value on this rank (a DTensor's local shard): a tensor, or lists, tuples
    and dicts of them (None and other values count nothing)."""
    if isinstance(value, torch.Tensor):
        dtensor = _dtensor_type()
        if dtensor is not None and isinstance(value, dtensor):
            value = value.to_local()
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def split_lr(lr, device) -> tuple[torch.Tensor | None, float]:
    """(lr_tensor, lr) as the ops take them: a tensor lr moves to ``device`` as fp32, else a float."""
    if isinstance(lr, torch.Tensor):
        return lr.to(device=device, dtype=torch.float32), 0.0
    return None, float(lr)


def _float32_on(t, device):
    return None if t is None else t.to(device=device, dtype=torch.float32)


def _block_size_of(numel: int, n_scales: int) -> int:
    """The fp8 block size a checkpoint used, from the number of its scales."""
    block = 32
    while block <= 4096:
        if num_blocks(numel, block) == n_scales:
            return block
        block *= 2
    raise ValueError(f"load_state_dict: {n_scales} fp8 scales fit no block size for {numel} elements")
