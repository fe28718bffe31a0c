"""Triton elementwise_step (Adam family, Lion, MARS, Sophia, Adam-mini, cautious): interpreter runs on CPU tensors
against fastopt.reference, and real sm_80 / sm_90 compiles.

How the interpreter is switched on: ``@triton.jit`` reads ``TRITON_INTERPRET`` when it *decorates* a function
(not when triton is imported), so setting the variable before importing triton is neither needed nor enough:
if any earlier test module imported ``fastopt.triton_kernels.elementwise_step``, its kernels are already compiled-mode
JITFunctions; and setting it process-wide would turn every kernel decorated later (the compile tests here, other
kernels' tests) into interpreted functions that ``triton.compile`` rejects. So each mode gets its own private copy
of elementwise_step.py, executed with ``TRITON_INTERPRET`` set only while that copy is imported (``_kernel_module``);
an interpreted kernel calls the helpers of its own copy, so the two copies never mix.
"""
import math
import re

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from fastopt.reference.adam import adam_step as reference_adam_step  # noqa: E402
from fastopt.reference.adam_mini import adam_mini_step as reference_adam_mini_step  # noqa: E402
from fastopt.reference.mars import mars_step as reference_mars_step  # noqa: E402
from fastopt.reference.moments import load as load_moment  # noqa: E402
from fastopt.reference.rounding import bf16_stochastic_round, hash32, sr_tensor_key  # noqa: E402
from fastopt.reference.sophia import sophia_step as reference_sophia_step  # noqa: E402
from fastopt.reference.update import effective_grad  # noqa: E402
from fastopt.state import quantize_e4m3  # noqa: E402
from triton_testing import compile_check, compile_checks_in_subprocess, kernel_module  # noqa: E402

SHAPES = [(), (1,), (4097,), (123, 457), (8, 3, 3, 3), (0,)]
FP8 = torch.float8_e4m3fn
BLOCK = 128


def _kernel_module(interpret: bool):
    """The private copy of elementwise_step.py; the interpreted one also has the test's own kernels, which expose the
    bit-level helpers."""
    return kernel_module("elementwise_step", interpret, codec_kernel=_codec_kernel,
                         segment_index_kernel=_segment_index_kernel)


def _codec_kernel(x_ptr, code_ptr, dec_ptr, bf16_ptr, n, BLOCK: tl.constexpr):
    k = _kernel_module(True)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(code_ptr + offs, k._e4m3_encode(x), mask=mask)
    tl.store(dec_ptr + offs, k._e4m3_decode((offs & 255).to(tl.uint8)), mask=mask)
    tl.store(bf16_ptr + offs, k._bf16_rne(x), mask=mask)


def _segment_index_kernel(start_ptr, seg_len_ptr, out_ptr, CHUNK: tl.constexpr):
    """Program i: out[i, :] = _segment_index(start[i], arange(CHUNK), seg_len[i]) as int64 (q0 + q)."""
    k = _kernel_module(True)
    i = tl.program_id(0)
    loc = tl.arange(0, CHUNK)
    q0, q = k._segment_index(tl.load(start_ptr + i), loc, tl.load(seg_len_ptr + i), CHUNK)
    tl.store(out_ptr + i * CHUNK + loc, q0 + q)


# ----------------------------------------------------------------------------- buckets and the oracle
# A bucket is a dict of the step's tensor-list arguments, by name (an adam_step, mars_step, sophia_step or
# adam_mini_step bucket; the last also holds segment_lengths, a list of ints).
# Its state lists: (name, name of its fp8 scales, whether it is a second moment).
_STATE = (("exp_avgs", "exp_avg_scales", False), ("exp_avg_sqs", "exp_avg_sq_scales", True),
          ("max_exp_avg_sqs", "max_exp_avg_sq_scales", True), ("last_grads", "last_grad_scales", False),
          ("hessians", "hessian_scales", False))
# Sophia: rho * bs * h = SOPHIA_DENOM * exp(2 N(0, 1)) against |m| ~ 1e-2 (see _make_bucket): the step is clipped
# (min(., 1) = 1) for 40-60% of the elements with h > 0 of the big tensors.
SOPHIA_RHO, SOPHIA_BS, SOPHIA_DENOM = 0.04, 100.0, 1e-2


def _hessian_values(shape, gen):
    """Hessian EMA values for Sophia: log-normal, with about 1/8 of them negative and 1/8 exactly zero."""
    h = torch.exp(2 * torch.randn(shape, generator=gen)) * (SOPHIA_DENOM / (SOPHIA_RHO * SOPHIA_BS))
    kind = torch.randint(0, 8, shape, generator=gen)
    return torch.where(kind == 0, -h, torch.where(kind == 1, 0.0, h))


def _make_bucket(shapes, pdtype, sdtype, amsgrad=False, master=False, seed=0, rule="adam", segments=None):
    """Tensor i has gradients (and, for MARS, last gradients) of size 10^-(i % 3). A Sophia bucket has exp_avgs
    and hessians (_hessian_values), and no second moments or steps. An Adam-mini bucket has exp_avgs, segment
    lengths ``segments`` (default: the numel) and fp32 step sizes 10^(i % 3 - 2) exp(N(0, 1) / 2) (updates of
    1e-3 to 1e-2, like Adam's), and no second moments or steps."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda s, scale: torch.randn(s, generator=gen) * scale  # noqa: E731
    grad_size = lambda i: 10.0 ** -(i % 3)  # noqa: E731
    p32 = [rand(s, 1.0) for s in shapes]
    b = {"params": [p.to(pdtype) for p in p32],
         "grads": [rand(s, grad_size(i)).to(pdtype) for i, s in enumerate(shapes)],
         "master_params": [p.clone() for p in p32] if master else []}

    def stored(vals, squared=False):
        if sdtype != FP8:
            return [v.to(sdtype) for v in vals], []
        codes, scales = zip(*(quantize_e4m3(v.sqrt() if squared else v, BLOCK) for v in vals))
        return list(codes), list(scales)

    def moment(squared, size=lambda i: 1e-2):
        return stored([rand(s, size(i)) ** 2 if squared else rand(s, size(i)) for i, s in enumerate(shapes)],
                      squared)

    b["exp_avgs"], b["exp_avg_scales"] = moment(False)
    if rule == "adam_mini":
        numels = [math.prod(s) for s in shapes]
        b["segment_lengths"] = list(segments) if segments is not None else [max(n, 1) for n in numels]
        b["step_sizes"] = [torch.exp(0.5 * torch.randn(n // seg, generator=gen)) / (100 * grad_size(i))
                           for i, (n, seg) in enumerate(zip(numels, b["segment_lengths"]))]
        return b
    if rule == "sophia":
        b["hessians"], b["hessian_scales"] = stored([_hessian_values(s, gen) for s in shapes])
        return b
    b["exp_avg_sqs"], b["exp_avg_sq_scales"] = moment(True)
    b["max_exp_avg_sqs"], b["max_exp_avg_sq_scales"] = moment(True) if amsgrad else ([], [])
    if rule == "mars":
        b["last_grads"], b["last_grad_scales"] = moment(False, grad_size)
    b["state_steps"] = [torch.tensor(float(t)) for t in (1, 2, 7, 1000, 3, 5)[: len(shapes)]]
    return b


def _clone(b):
    return {k: [t.clone() if isinstance(t, torch.Tensor) else t for t in v] for k, v in b.items()}


def _state_fp64(b, block=BLOCK):
    """{name: list of float64 values} of a bucket's state lists (v, not sqrt v)."""
    scales = lambda k, i: b[k][i] if b[k] else None  # noqa: E731
    return {k: [load_moment(x, scales(sk, i), block, torch.float64, squared=sq) for i, x in enumerate(b[k])]
            for k, sk, sq in _STATE if k in b}


def _to_fp64(b, block=BLOCK):
    """The oracle's inputs: every value in float64, plain (unquantized) state, no master copy."""
    src = b["master_params"] or b["params"]
    return {"params": [p.double() for p in src], "grads": [g.double() for g in b["grads"]], "master_params": [],
            **{k: _clone(b)[k] for k in ("state_steps", "step_sizes", "segment_lengths") if k in b},
            **_state_fp64(b, block), **{sk: [] for k, sk, _ in _STATE if k in b}}


def _run(fn, b, opts):
    fn(**b, **opts)


def _moments(b, block=BLOCK):
    """{name: list of float64 values} of a bucket's params, master params and state (v, not sqrt v)."""
    return {"params": [p.double() for p in b["params"]], "master": [p.double() for p in b["master_params"]],
            **_state_fp64(b, block)}


def assert_matches_oracle(name, fast, same, oracle, atol_rel=1e-6):
    """flash-attention's rule: max|fast - oracle| <= 2 * max|torch path in the same dtypes - oracle| + atol.

    ``oracle`` is the reference run in float64 with plain state; ``same`` the reference run with the fast
    path's storage dtypes. The one place to change the comparison."""
    for i, (f, s, o) in enumerate(zip(fast, same, oracle)):
        if o.numel() == 0:
            continue
        err, base = (f - o).abs().max().item(), (s - o).abs().max().item()
        atol = atol_rel * o.abs().max().item() + 1e-30
        assert err <= 2 * base + atol, f"{name}[{i}] {tuple(o.shape)}: error {err:.3g} > 2 * {base:.3g} + {atol:.3g}"


_OPTS = {  # the scalar arguments of each rule's step
    "adam": dict(lr_tensor=None, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, nesterov=False,
                 maximize=False, cautious=False, block_size=BLOCK, sr_seed=-1, grad_scale=None, found_inf=None),
    "mars": dict(lr_tensor=None, lr=3e-3, beta1=0.95, beta2=0.99, eps=1e-8, weight_decay=0.1, gamma=0.025,
                 maximize=False, cautious=False, block_size=BLOCK, sr_seed=-1, grad_scale=None, found_inf=None),
    "sophia": dict(lr_tensor=None, lr=1e-2, beta1=0.965, rho=SOPHIA_RHO, bs=SOPHIA_BS, weight_decay=0.1,
                   maximize=False, block_size=BLOCK, sr_seed=-1, grad_scale=None, found_inf=None),
    "adam_mini": dict(lr_tensor=None, lr=1e-2, beta1=0.9, weight_decay=0.1, maximize=False, block_size=BLOCK,
                      sr_seed=-1, grad_scale=None, found_inf=None)}
_REFERENCE = {"adam": reference_adam_step, "mars": reference_mars_step, "sophia": reference_sophia_step,
              "adam_mini": reference_adam_mini_step}


def _check_step(shapes, pdtype, sdtype, amsgrad, master, seed=0, rule="adam", segments=None, **overrides):
    opts = dict(_OPTS[rule], **overrides)
    b = _make_bucket(shapes, pdtype, sdtype, amsgrad, master, seed, rule=rule, segments=segments)
    fast, same, oracle = _clone(b), _clone(b), _to_fp64(b)
    _run(getattr(_kernel_module(True), f"{rule}_step"), fast, opts)
    _run(_REFERENCE[rule], same, opts)
    _run(_REFERENCE[rule], oracle, dict(opts, sr_seed=-1))
    f, s, o = _moments(fast), _moments(same), _moments(oracle)
    assert_matches_oracle("params", f["params"], s["params"], o["params"])
    if master:
        assert_matches_oracle("master_params", f["master"], s["master"], o["params"])
    for k, _, _ in _STATE:
        if k in b:
            assert_matches_oracle(k, f[k], s[k], o[k])
    return b, fast


# ----------------------------------------------------------------------------- interpreter tests
@pytest.mark.parametrize("nesterov", [False, True], ids=["adamw", "nadamw"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
@pytest.mark.parametrize("sdtype", [torch.float32, torch.bfloat16, FP8], ids=["s_fp32", "s_bf16", "s_fp8"])
@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16, torch.float16], ids=["p_fp32", "p_bf16", "p_fp16"])
def test_matches_reference(pdtype, sdtype, amsgrad, nesterov):
    _check_step(SHAPES, pdtype, sdtype, amsgrad, master=False, nesterov=nesterov)


@pytest.mark.parametrize("sdtype", [torch.float32, FP8], ids=["s_fp32", "s_fp8"])
@pytest.mark.parametrize("pdtype", [torch.bfloat16, torch.float16], ids=["p_bf16", "p_fp16"])
def test_options_master_lr_tensor_grad_scale(pdtype, sdtype):
    _check_step(SHAPES, pdtype, sdtype, amsgrad=True, master=True, seed=1, nesterov=True, maximize=True,
                lr_tensor=torch.tensor(3e-3), lr=123.0, grad_scale=torch.tensor(1024.0),
                found_inf=torch.tensor(0.0), weight_decay=0.0)


def test_beta_edge_values():
    """beta1 = 0 (ln 0 = -inf on the host) and a large step: bias corrections of exactly 1."""
    _check_step([(4097,)], torch.float32, torch.float32, False, False, beta1=0.0, beta2=0.5)


# Gradients of size 1, 0.1, 0.01, 1, 0.1, 0.01 (see _make_bucket): the large tensors have ||c|| > 1 (clipped, the
# norm summed over many chunks), the small ones ||c|| < 1.
MARS_SHAPES = [(123, 457), (7,), (0,), (4097,), (), (8, 3, 3, 3)]
MARS_CLIPPED = [True, False, False, True, False, False]


def _check_mars_step(pdtype, sdtype, amsgrad, master=False, **overrides):
    """_check_step for MARS on MARS_SHAPES; also checks which tensors are clipped (with a margin, so that rounding
    cannot flip it) and that last_grads holds the effective gradient g, exactly when stored in fp32."""
    opts = dict(_OPTS["mars"], **overrides)
    b, fast = _check_step(MARS_SHAPES, pdtype, sdtype, amsgrad, master, rule="mars", **overrides)
    k = opts["gamma"] * opts["beta1"] / (1 - opts["beta1"])
    grads = [effective_grad(g, torch.float64, opts["grad_scale"], opts["maximize"]) for g in b["grads"]]
    norms = [torch.linalg.vector_norm(g + k * (g - g_prev)).item()
             for g, g_prev in zip(grads, _state_fp64(b)["last_grads"])]
    assert all(abs(x - 1) > 0.1 for x in norms) and [x > 1 for x in norms] == MARS_CLIPPED, norms
    if sdtype == torch.float32:
        for i, (last, g) in enumerate(zip(fast["last_grads"], b["grads"])):
            assert torch.equal(last, effective_grad(g, torch.float32, opts["grad_scale"], opts["maximize"])), i


@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
@pytest.mark.parametrize("sdtype", [torch.float32, torch.bfloat16, FP8], ids=["s_fp32", "s_bf16", "s_fp8"])
@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16, torch.float16], ids=["p_fp32", "p_bf16", "p_fp16"])
def test_mars_matches_reference(pdtype, sdtype, amsgrad):
    _check_mars_step(pdtype, sdtype, amsgrad)


@pytest.mark.parametrize("pdtype, sdtype, options", [
    (torch.float32, torch.float32, {}),
    (torch.bfloat16, FP8, dict(maximize=True, lr_tensor=torch.tensor(1e-3), lr=123.0, grad_scale=torch.tensor(2.0),
                               found_inf=torch.tensor(0.0))),
    (torch.float16, torch.bfloat16, dict(maximize=True, grad_scale=torch.tensor(0.5)))],
    ids=["p_fp32-s_fp32", "p_bf16-s_fp8-options", "p_fp16-s_bf16-options"])
def test_mars_cautious(pdtype, sdtype, options):
    """The cautious mask of MARS compares u with the raw gradient g, not with c."""
    _check_mars_step(pdtype, sdtype, amsgrad=True, master=pdtype != torch.float32, cautious=True, **options)


def _check_sophia_step(pdtype, sdtype, master=False, **overrides):
    """_check_step for Sophia on SHAPES; also checks that both sides of min(|m| / denom, 1), negative h and zero h
    occur in every big tensor, and that hessians and their scales are left bit for bit as they were."""
    opts = dict(_OPTS["sophia"], **overrides)
    b, fast = _check_step(SHAPES, pdtype, sdtype, False, master, rule="sophia", **overrides)
    grads = [effective_grad(g, torch.float64, opts["grad_scale"], opts["maximize"]) for g in b["grads"]]
    state = _state_fp64(b)
    for g, m, h in zip(grads, state["exp_avgs"], state["hessians"]):
        if h.numel() > 1000:
            m = opts["beta1"] * m + (1 - opts["beta1"]) * g
            ratio = m.abs() / ((opts["rho"] * opts["bs"] * h).clamp(min=0) + 1e-15)
            assert bool((ratio < 0.5).any() and (ratio > 2).any() and (h < 0).any() and (h == 0).any())
    for k in ("hessians", "hessian_scales"):
        for i, (x, y) in enumerate(zip(fast[k], b[k])):
            assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), (k, i)


@pytest.mark.parametrize("sdtype", [torch.float32, torch.bfloat16, FP8], ids=["s_fp32", "s_bf16", "s_fp8"])
@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16, torch.float16], ids=["p_fp32", "p_bf16", "p_fp16"])
def test_sophia_matches_reference(pdtype, sdtype):
    _check_sophia_step(pdtype, sdtype)


# Options of the rules without amsgrad or cautious (Sophia, Adam-mini), with master weights: (pdtype, sdtype, options)
_OPTION_CASES = pytest.mark.parametrize("pdtype, sdtype, options", [
    (torch.bfloat16, FP8, dict(maximize=True, lr_tensor=torch.tensor(3e-3), lr=123.0, grad_scale=torch.tensor(2.0),
                               found_inf=torch.tensor(0.0), sr_seed=12345)),
    (torch.float16, torch.bfloat16, dict(maximize=True, grad_scale=torch.tensor(0.5), weight_decay=0.0))],
    ids=["p_bf16-s_fp8-options-sr", "p_fp16-s_bf16-options"])


@_OPTION_CASES
def test_sophia_options(pdtype, sdtype, options):
    _check_sophia_step(pdtype, sdtype, master=True, **options)


def test_sophia_special_values():
    """sign(0) = 0; h <= 0 or -inf: full step, unless |m| < 1e-15; h = +inf: no step; NaN in g or h: NaN. As the
    reference in fp32."""
    nan, inf = float("nan"), float("inf")
    g = torch.tensor([0.0, 0.0, 1.0, -1.0, 1.0, -1.0, 1.0, nan, 1.0, 1e-15, -2.0, 0.0])
    m = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    h = torch.tensor([0.0, inf, -1.0, -inf, inf, 0.0, nan, 1.0, 1e-3, 0.0, 3.0, 1e30])
    n = 3000  # more than one chunk, with a partial one
    b = {"params": [torch.linspace(-1, 1, n)], "grads": [g.repeat(n // 12)], "exp_avgs": [m.repeat(n // 12)],
         "hessians": [h.repeat(n // 12)], "exp_avg_scales": [], "hessian_scales": [], "master_params": []}
    fast, same = _clone(b), _clone(b)
    _run(_kernel_module(True).sophia_step, fast, _OPTS["sophia"])
    _run(reference_sophia_step, same, _OPTS["sophia"])
    for k in ("params", "exp_avgs", "hessians"):
        torch.testing.assert_close(fast[k][0], same[k][0], rtol=1e-6, atol=0, equal_nan=True, msg=k)
    assert fast["params"][0].isnan().sum() == 2 * n // 12


# Segment lengths (tensor: L): one segment per row, 457 not dividing the chunk (segments straddle chunk
# boundaries); L = 1 (one step size per element, also over two chunks); L = 2 * 4097 (segments spanning several
# chunks, boundaries inside a chunk); L = numel (one step size for the tensor, over one chunk and over two);
# an empty tensor; a scalar; 27 (per output channel of a conv weight); 61 (a prime that divides no chunk).
ADAM_MINI_SHAPES = [(123, 457), (7,), (4, 4097), (0,), (), (8, 3, 3, 3), (2100,), (2, 1500), (41, 61)]
ADAM_MINI_SEGMENTS = [457, 1, 2 * 4097, 5, 1, 27, 1, 3000, 61]


def _check_adam_mini_step(pdtype, sdtype, master=False, **overrides):
    """_check_step for Adam-mini on ADAM_MINI_SHAPES; also checks that step_sizes are left bit for bit as they
    were."""
    b, fast = _check_step(ADAM_MINI_SHAPES, pdtype, sdtype, False, master, rule="adam_mini",
                          segments=ADAM_MINI_SEGMENTS, **overrides)
    for i, (x, y) in enumerate(zip(fast["step_sizes"], b["step_sizes"])):
        assert torch.equal(x.view(torch.int32), y.view(torch.int32)), i
    assert fast["segment_lengths"] == ADAM_MINI_SEGMENTS


@pytest.mark.parametrize("sdtype", [torch.float32, torch.bfloat16, FP8], ids=["s_fp32", "s_bf16", "s_fp8"])
@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16, torch.float16], ids=["p_fp32", "p_bf16", "p_fp16"])
def test_adam_mini_matches_reference(pdtype, sdtype):
    _check_adam_mini_step(pdtype, sdtype)


@_OPTION_CASES
def test_adam_mini_options(pdtype, sdtype, options):
    _check_adam_mini_step(pdtype, sdtype, master=True, **options)


def test_adam_mini_segment_index_exact():
    """_segment_index equals (start + loc) // L in int64 for L from 1 to past the chunk and 2^32, and chunk
    offsets past 2^31 and 2^32 (each (start, L) pair: one program over a chunk), for CHUNK and fp8's biggest."""
    k = _kernel_module(True)
    for chunk in (k.CHUNK, max(k.CHUNK, *k.FP8_BLOCK_SIZES)):
        # lengths below, at and past the chunk, primes, past 2^31 and 2^32
        lengths = [1, 2, 3, 7, 41, 61, 127, 457, 2213, chunk - 1, chunk, chunk + 1, 2 * chunk - 1, 2 * chunk + 3,
                   8194, 10 ** 6, (1 << 31) + 5, (1 << 32) + 7]
        chunk_ids = [0, 1, 2, 5, 1000, (1 << 31) // chunk + 3, (1 << 32) // chunk + 1, (1 << 40) // chunk + 17]
        starts = torch.tensor([c * chunk for c in chunk_ids for _ in lengths], dtype=torch.int64)
        seg = torch.tensor(lengths * len(chunk_ids), dtype=torch.int64)
        out = torch.empty(starts.numel(), chunk, dtype=torch.int64)
        k.segment_index_kernel[(starts.numel(),)](starts, seg, out, CHUNK=chunk)
        want = (starts[:, None] + torch.arange(chunk)) // seg[:, None]
        assert torch.equal(out, want), chunk


def test_adam_mini_64bit_offsets():
    """A chunk past element 2^31 (as test_64bit_offsets): the step size of each element comes from the segment of
    its 64-bit index, for segments shorter than, straddling and longer than a chunk."""
    k = _kernel_module(True)
    first = (1 << 31) // k.CHUNK + 3
    start = first * k.CHUNK
    n = k.CHUNK + 1000
    opts = _OPTS["adam_mini"]
    for seg_len in (7, 457, 3 * k.CHUNK + 5):
        q0, q1 = start // seg_len, (start + n - 1) // seg_len
        b = _make_bucket([(n,)], torch.float32, torch.float32, rule="adam_mini")
        b["step_sizes"] = [torch.rand(q1 - q0 + 1) * 1e-2]
        lists = [b.get(name, []) for name in k._SLOT_NAMES]
        table, _ = k._build_ptr_table(1, lists, [start + n], torch.device("cpu"), [seg_len])
        for slot in (k.P, k.G, k.M):
            table[0, slot] -= start * 4
        table[0, k.STEP_SIZES] -= q0 * 4
        p, g, m = (b[name][0].clone() for name in ("params", "grads", "exp_avgs"))
        dummy = torch.zeros(1)
        k.elementwise_step_kernel[(2,)](
            table, torch.tensor([[0, first], [0, first + 1]], dtype=torch.int32), dummy, dummy, dummy, dummy, dummy,
            opts["lr"], opts["beta1"], 0.0, 0.0, opts["weight_decay"], 0.0, 0.0, 0.0, -1,
            MATH=k.ADAM_MINI, MODE=0, PARAM_DTYPE=k.F32, STATE_DTYPE=k.F32, AMSGRAD=False, MASTER=False,
            MAXIMIZE=False, HAS_LR_TENSOR=False, HAS_GRAD_SCALE=False, HAS_FOUND_INF=False, CAUTIOUS=False,
            PASS=k.UPDATE, SR=False, ALIGNED=True, CHUNK=k.CHUNK, BLOCK_Q=k.CHUNK)
        m = opts["beta1"] * m + (1 - opts["beta1"]) * g
        s = b["step_sizes"][0][(start + torch.arange(n)) // seg_len - q0]
        p = p * (1 - opts["lr"] * opts["weight_decay"]) - m * s
        torch.testing.assert_close(b["exp_avgs"][0], m, rtol=1e-6, atol=0, msg=f"exp_avgs, L = {seg_len}")
        torch.testing.assert_close(b["params"][0], p, rtol=1e-6, atol=1e-9, msg=f"params, L = {seg_len}")


@pytest.mark.parametrize("rule", ["adam", "mars", "sophia", "adam_mini"])
def test_found_inf_writes_nothing(rule):
    b = _make_bucket(SHAPES, torch.bfloat16, FP8, amsgrad=True, master=True, rule=rule)
    fast = _clone(b)
    _run(getattr(_kernel_module(True), f"{rule}_step"), fast, dict(
        _OPTS[rule], **({} if rule in ("sophia", "adam_mini") else {"cautious": True}), grad_scale=torch.tensor(2.0),
        found_inf=torch.tensor(1.0)))
    for k in b:
        for x, y in zip(fast[k], b[k]):
            if isinstance(y, torch.Tensor):
                assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), k


def _sr_opts(seed, lr=1e-3, wd=0.0):
    return dict(_OPTS["adam"], lr=lr, weight_decay=wd, sr_seed=seed)


def _bf16_neighbours(x):
    """The bf16 values just below and just above each fp32 value (equal when x is a bf16 value)."""
    down = x.view(torch.int32) & ~0xFFFF
    lo = down.view(torch.float32)
    hi = torch.where(lo == x, lo, (down + 0x10000).view(torch.float32))
    return torch.minimum(lo, hi), torch.maximum(lo, hi)


def test_stochastic_rounding_bits_and_neighbours():
    """With master weights the kernel's own fp32 result is visible: the bf16 param must be exactly the spec's
    hash-based rounding of it (per-tensor key, element index), hence one of its two bf16 neighbours."""
    shapes = [(4097,), (123, 457), (3,)]
    b = _make_bucket(shapes, torch.bfloat16, torch.float32, master=True)
    fast = _clone(b)
    _run(_kernel_module(True).adam_step, fast, _sr_opts(seed=20240611))
    for i, (p, mp) in enumerate(zip(fast["params"], fast["master_params"])):
        expected = bf16_stochastic_round(mp, sr_tensor_key(20240611, i))
        assert torch.equal(p.view(torch.int16), expected.view(torch.int16)), f"tensor {i}"
        lo, hi = _bf16_neighbours(mp)
        assert bool(((p.float() == lo) | (p.float() == hi)).all())
    # without master weights: still one of the two neighbours of the exact (fp64) result, give or take the
    # fp32 rounding of that result
    b, fast = _check_step(shapes, torch.bfloat16, torch.float32, False, False, sr_seed=7)
    oracle = _to_fp64(b)
    _run(reference_adam_step, oracle, _sr_opts(seed=-1, lr=1e-2, wd=0.1))
    for p, o in zip(fast["params"], oracle["params"]):
        lo, _ = _bf16_neighbours(o.float().nextafter(torch.tensor(-float("inf"))))
        _, hi = _bf16_neighbours(o.float().nextafter(torch.tensor(float("inf"))))
        assert bool(((p.float() >= lo) & (p.float() <= hi)).all())


def test_stochastic_rounding_unbiased():
    """lr = 0 leaves the fp32 value c = 1 + 0.3 bf16-ulp unchanged: SR must round up 30% of the time."""
    n = 1 << 16
    c = 1.0 + 0.3 * 2.0 ** -7
    b = _make_bucket([(n,)], torch.bfloat16, torch.float32, master=True)
    b["master_params"][0].fill_(c)
    _run(_kernel_module(True).adam_step, b, _sr_opts(seed=99, lr=0.0))
    assert bool((b["master_params"][0] == c).all())
    up = (b["params"][0].float() > c).double().mean().item()
    assert abs(up - 0.3) < 0.01, up  # 5 standard deviations
    # random values: mean rounding error, in units of the bf16 spacing, is ~0 (RNE gives the same, SR must too)
    b = _make_bucket([(n,)], torch.bfloat16, torch.float32, master=True, seed=3)
    _run(_kernel_module(True).adam_step, b, _sr_opts(seed=5))
    mp, p = b["master_params"][0], b["params"][0].float()
    lo, hi = _bf16_neighbours(mp)
    frac = ((p - mp) / torch.where(hi > lo, hi - lo, 1.0)).double()
    assert abs(frac.mean().item()) < 0.01


def test_codecs_bit_exact():
    """e4m3 encode / decode and bf16 RNE of the kernel equal torch's conversions bit for bit."""
    k = _kernel_module(True)
    vals = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    finite = vals[~vals.isnan()].unique()
    mids = (finite[1:] + finite[:-1]) / 2  # exact ties
    x = torch.cat([finite, -finite, mids, -mids, mids.nextafter(finite[1:]), mids.nextafter(finite[:-1]),
                   torch.tensor([448.0, 460.0, 464.0, 1e9, float("inf"), -float("inf"), float("nan"), -0.0,
                                 2.0 ** -10, 2.0 ** -6, 2.0 ** -6 - 2.0 ** -30, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8]),
                   torch.randn(2000) * 30, torch.randn(2000) * 1e-3,
                   (torch.randint(-(2 ** 31), 2 ** 31 - 1, (4000,), dtype=torch.int64)).to(torch.int32).view(
                       torch.float32)])
    n = x.numel()
    code = torch.empty(n, dtype=torch.uint8)
    dec = torch.empty(n, dtype=torch.float32)
    bf = torch.empty(n, dtype=torch.int16)
    k.codec_kernel[(1,)](x, code, dec, bf, n, BLOCK=triton.next_power_of_2(n))
    nan = x.isnan()
    want = x.clamp(-448, 448).to(FP8).view(torch.uint8)
    assert torch.equal(code[~nan], want[~nan])
    assert bool(((code[nan] & 0x7F) == 0x7F).all())
    ref_dec = torch.arange(256, dtype=torch.uint8).view(FP8).float().repeat(n // 256 + 1)[:n]
    assert torch.equal(dec.isnan(), ref_dec.isnan()) and torch.equal(dec[~dec.isnan()], ref_dec[~ref_dec.isnan()])
    want_bf = x.to(torch.bfloat16).view(torch.int16)
    assert torch.equal(bf[~nan], want_bf[~nan]) and bool(bf[nan].view(torch.bfloat16).isnan().all())


def test_64bit_offsets():
    """Two chunks past element 2^31 (tensors that big do not fit here): the table's addresses are shifted back
    by the offset of the first, so the kernel's 64-bit arithmetic lands on small real buffers. The fp8 scale
    index, the tail mask and the stochastic-rounding element index (its low 32 bits) all use the big offset."""
    k = _kernel_module(True)
    first = (1 << 31) // k.CHUNK + 3
    start = first * k.CHUNK                      # > 2^31
    n = k.CHUNK + 1000                           # one full chunk and one partial chunk
    b = _make_bucket([(n,)], torch.bfloat16, FP8, amsgrad=True, master=True)
    fast, same = _clone(b), _clone(b)
    lists = [fast.get(name, []) for name in k._SLOT_NAMES]
    table, _ = k._build_ptr_table(1, lists, [start + n], torch.device("cpu"))
    for slot, lst in enumerate(lists):
        if lst and slot != k.STEP:
            per_element = 4 / BLOCK if slot in (k.M_SC, k.V_SC, k.VMAX_SC, k.LAST_SC) else lst[0].element_size()
            table[0, slot] -= int(start * per_element)
    dummy = fast["state_steps"][0]
    k.elementwise_step_kernel[(2,)](
        table, torch.tensor([[0, first], [0, first + 1]], dtype=torch.int32), dummy, dummy, dummy, dummy, dummy,
        1e-2, 0.9, 0.999, 1e-8, 0.1, math.log(0.9), math.log(0.999), 0.0, 11,
        MATH=k.ADAM, MODE=0, PARAM_DTYPE=k.BF16, STATE_DTYPE=k.FP8, AMSGRAD=True, MASTER=True, MAXIMIZE=False,
        HAS_LR_TENSOR=False, HAS_GRAD_SCALE=False, HAS_FOUND_INF=False, CAUTIOUS=False, PASS=k.UPDATE, SR=True,
        ALIGNED=True, CHUNK=k.CHUNK, BLOCK_Q=BLOCK)
    _run(reference_adam_step, same, _sr_opts(seed=-1, lr=1e-2, wd=0.1))
    for name in ("master_params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "exp_avg_scales",
                 "exp_avg_sq_scales", "max_exp_avg_sq_scales"):
        torch.testing.assert_close(fast[name][0].float(), same[name][0].float(), rtol=1e-5, atol=1e-7, msg=name)
    idx = (torch.arange(n, dtype=torch.int64) + start) & 0xFFFFFFFF
    r = hash32(idx ^ sr_tensor_key(11, 0)) & 0xFFFF
    bits = fast["master_params"][0].view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    assert torch.equal(fast["params"][0].view(torch.int16).to(torch.int64) & 0xFFFF, (bits + r) >> 16)


def test_tables_are_cached():
    k = _kernel_module(True)
    b = _make_bucket([(5000,), (7,)], torch.float32, torch.bfloat16)
    opts = _sr_opts(seed=-1)
    k._PTR_TABLES.clear()
    k._CHUNK_TABLES.clear()
    _run(k.adam_step, b, opts)
    ptr_tables, chunk_tables = list(k._PTR_TABLES.values()), list(k._CHUNK_TABLES.values())
    _run(k.adam_step, b, opts)
    assert all(a is b for a, b in zip(k._PTR_TABLES.values(), ptr_tables)) and len(ptr_tables) == 1
    assert all(a is b for a, b in zip(k._CHUNK_TABLES.values(), chunk_tables)) and len(chunk_tables) == 1
    assert chunk_tables[0].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0]]
    b["exp_avgs"][1] = b["exp_avgs"][1].clone()          # a new storage: a new pointer table, same chunks
    _run(k.adam_step, b, opts)
    assert len(k._PTR_TABLES) == 2 and len(k._CHUNK_TABLES) == 1


def test_validation_errors():
    k = _kernel_module(True)
    opts = _sr_opts(seed=-1)

    def call(**changes):
        b = _make_bucket([(10,), (4, 5)], torch.float32, torch.float32)
        b.update(changes.pop("bucket", {}))
        k.adam_step(**b, **dict(opts, **changes))

    with pytest.raises(ValueError, match="grads has 1 tensors"):
        call(bucket={"grads": [torch.zeros(10)]})
    with pytest.raises(TypeError, match=r"grads\[1\] has dtype"):
        call(bucket={"grads": [torch.zeros(10), torch.zeros(4, 5, dtype=torch.float64)]})
    with pytest.raises(ValueError, match=r"exp_avgs\[1\] is not contiguous"):
        call(bucket={"exp_avgs": [torch.zeros(10), torch.zeros(5, 4).t()]})
    with pytest.raises(ValueError, match="has shape"):
        call(bucket={"exp_avg_sqs": [torch.zeros(10), torch.zeros(20)]})
    with pytest.raises(ValueError, match="is on meta"):
        call(bucket={"grads": [torch.zeros(10), torch.zeros(4, 5, device="meta")]})
    with pytest.raises(ValueError, match="lr_tensor must be"):
        call(lr_tensor=torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="state must be"):
        call(bucket={"exp_avgs": [torch.zeros(10, dtype=torch.float16), torch.zeros(4, 5, dtype=torch.float16)]})
    with pytest.raises(ValueError, match="block_size"):
        b = _make_bucket([(10,)], torch.float32, FP8)
        k.adam_step(**b, **dict(opts, block_size=96))
    with pytest.raises(ValueError, match="scales must be empty"):
        call(bucket={"exp_avg_scales": [torch.zeros(1), torch.zeros(1)]})

    b = _make_bucket([(10,), (4, 5)], torch.float32, FP8, rule="mars")
    with pytest.raises(ValueError, match="last_grads has 1 tensors, expected 2"):
        k.mars_step(**dict(b, last_grads=b["last_grads"][:1]), **_OPTS["mars"])
    with pytest.raises(ValueError, match="last_grad_scales has 0 tensors, expected 2"):
        k.mars_step(**dict(b, last_grad_scales=[]), **_OPTS["mars"])

    b = _make_bucket([(10,), (4, 5)], torch.float32, FP8, rule="sophia")
    with pytest.raises(ValueError, match="hessians has 0 tensors, expected 2"):
        k.sophia_step(**dict(b, hessians=[]), **_OPTS["sophia"])
    with pytest.raises(ValueError, match="hessian_scales has 1 tensors, expected 2"):
        k.sophia_step(**dict(b, hessian_scales=b["hessian_scales"][:1]), **_OPTS["sophia"])
    with pytest.raises(TypeError, match=r"hessians\[1\] has dtype torch.bfloat16"):
        k.sophia_step(**dict(b, hessians=[b["hessians"][0], torch.zeros(4, 5, dtype=torch.bfloat16)]),
                      **_OPTS["sophia"])
    with pytest.raises(ValueError, match=r"hessians\[0\] has shape"):
        k.sophia_step(**dict(b, hessians=[b["hessians"][1], b["hessians"][0]]), **_OPTS["sophia"])

    b = _make_bucket([(10,), (4, 5)], torch.float32, FP8, rule="adam_mini", segments=[2, 5])
    k.adam_mini_step(**b, **_OPTS["adam_mini"])
    with pytest.raises(ValueError, match=r"step_sizes\[1\] has 5 elements, expected 4"):
        k.adam_mini_step(**dict(b, step_sizes=[b["step_sizes"][0], torch.zeros(5)]), **_OPTS["adam_mini"])
    with pytest.raises(ValueError, match="step_sizes has 1 tensors, expected 2"):
        k.adam_mini_step(**dict(b, step_sizes=b["step_sizes"][:1]), **_OPTS["adam_mini"])
    with pytest.raises(TypeError, match=r"step_sizes\[0\] has dtype torch.bfloat16"):
        k.adam_mini_step(**dict(b, step_sizes=[b["step_sizes"][0].bfloat16(), b["step_sizes"][1]]),
                         **_OPTS["adam_mini"])
    # the very tensors of the successful call, a segment length not dividing numel: the table cache must miss
    with pytest.raises(ValueError, match=r"segment_lengths\[1\] is 3, expected a positive int dividing"):
        k.adam_mini_step(**dict(b, segment_lengths=[2, 3]), **_OPTS["adam_mini"])
    with pytest.raises(ValueError, match=r"segment_lengths\[0\] is 0"):
        k.adam_mini_step(**dict(b, segment_lengths=[0, 5]), **_OPTS["adam_mini"])
    with pytest.raises(ValueError, match="segment_lengths has 1 entries, expected 2"):
        k.adam_mini_step(**dict(b, segment_lengths=[2]), **_OPTS["adam_mini"])


# ----------------------------------------------------------------------------- momentum pass (Muon, Scion, ROOT)
# (against its equations and the quantiser with the CPU kernel's tests: tests/test_muon.py)
def test_momentum_direction_norm_of_huge_directions():
    """Σ M² is summed in float64 from the first square: no overflow where M² passes float32's range."""
    g, sumsqs = torch.full((3000,), 3e25), torch.empty(1, dtype=torch.float64)
    _kernel_module(True).momentum_direction([torch.zeros(3000)], [], 1, [g], [torch.empty(3000)], sumsqs, 0.0, 1.0,
                                            0.0, 1.0)
    assert sumsqs[0].item() == pytest.approx(3000 * 3e25 ** 2, rel=1e-6)


def test_momentum_direction_validation_errors():
    k = _kernel_module(True)

    def call(bufs, scales=(), block_size=128, grads=None, directions=None, sumsqs=None):
        grads = [torch.zeros(10), torch.zeros(4, 5)] if grads is None else grads
        directions = [torch.empty(g.shape) for g in grads] if directions is None else directions
        sumsqs = torch.empty(len(grads), dtype=torch.float64) if sumsqs is None else sumsqs
        k.momentum_direction(bufs, list(scales), block_size, grads, directions, sumsqs, 0.9, 0.1, 0.0, 1.0)

    fp32 = [torch.zeros(10), torch.zeros(20)]
    with pytest.raises(TypeError, match="bufs must be"):
        call([torch.zeros(10, dtype=torch.float16), torch.zeros(20, dtype=torch.float16)])
    with pytest.raises(TypeError, match="grads must be"):
        call(fp32, grads=[torch.zeros(10, dtype=torch.float64), torch.zeros(20, dtype=torch.float64)])
    with pytest.raises(TypeError, match="directions must be"):
        call(fp32, directions=[torch.empty(10, dtype=torch.float16), torch.empty(20, dtype=torch.float16)])
    with pytest.raises(ValueError, match=r"bufs\[1\] has 21 elements, expected 20"):
        call([torch.zeros(10), torch.zeros(21)])
    with pytest.raises(ValueError, match="bufs has 1 tensors, expected 2"):
        call(fp32[:1])
    with pytest.raises(ValueError, match="sumsqs must be a float64 tensor of shape"):
        call(fp32, sumsqs=torch.empty(2))
    with pytest.raises(ValueError, match="buf_scales must be empty|buf_scales has 1 tensors, expected 0"):
        call(fp32, scales=[torch.zeros(1)])
    fp8 = [torch.zeros(10, dtype=FP8), torch.zeros(20, dtype=FP8)]
    with pytest.raises(ValueError, match="buf_scales has 0 tensors, expected 2"):
        call(fp8)
    with pytest.raises(ValueError, match=r"buf_scales\[1\] has 2 elements, expected 1"):
        call(fp8, scales=[torch.zeros(1), torch.zeros(2)])
    with pytest.raises(ValueError, match="block_size"):
        call(fp8, scales=[torch.zeros(1), torch.zeros(1)], block_size=96)


# ----------------------------------------------------------------------------- compile tests (no GPU needed)
_SPECS = _kernel_module(False).compile_specs()
_OPTIONS = {"num_warps": _kernel_module(False).NUM_WARPS, "maxnreg": _kernel_module(False).MAX_REGISTERS}


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("spec", _SPECS, ids=[s[0] for s in _SPECS])
def test_compiles_without_spills(spec, arch):
    """The shipped configurations compile to PTX and cubin for sm_80 and sm_90, use no native fp8 conversion,
    and ptxas reports no register spills.

    Triton's own standard-library @jit functions are decorated when triton is first imported; if that import
    happened with TRITON_INTERPRET=1 (another test module set it, or the environment), they are interpreted
    functions that the compiler cannot call, so the checks then run in a subprocess without the variable."""
    name = spec[0]
    if isinstance(tl.standard._elementwise_max, triton.runtime.JITFunction):
        res = compile_check(_kernel_module(False), name, arch, **_OPTIONS)
    else:
        res = compile_checks_in_subprocess("elementwise_step", **_OPTIONS)[f"{name}-{arch}"]
    assert re.search(rf"\.entry {spec[1].__name__}\b", res["ptx"]) and res["cubin"] > 0
    assert not re.search(r"cvt\.[\w.]*e4m3", res["ptx"]), "native fp8 conversion (absent on sm_80)"
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", res["ptxas"])]
    regs = re.search(r"Used (\d+) registers", res["ptxas"])
    assert spills and not any(spills), f"{name} sm_{arch}: register spills\n{res['ptxas']}"
    assert regs and int(regs.group(1)) <= 255, res["ptxas"]
