"""Every kernel backend against the reference, through the optimizer classes.

Tolerance rule (flash-attention's): a fast path's error against the float64 reference may be
at most twice the error of the plain-torch path with the same storage dtypes, plus a small atol.
Each run has odd shapes, a parameter whose grad is None on one step (so per-tensor step counts
differ) and a frozen parameter.
"""

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

import fastopt
from fastopt import backends

SHAPES = [(), (1,), (4097,), (123, 457), (8, 3, 3, 3)]
PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STATE_DTYPES = ["fp32", "bf16", "fp8"]
STEPS = 4
# params small next to the steps (lr 1e-2): a low-precision param's rounding then stays far
# below an error in the update, which the comparison would otherwise not see
INIT_SCALE = 0.02


def cpu_backends():
    return [b for b in ("cpu", "triton") if backends.probe(b).available]


def fp8_codec_backends():
    """(backend, device) pairs whose fp8 codes must be the reference quantiser's bytes: the cpu backends on CPU
    tensors, and the GPU kernels (sm_89 and later encode and decode e4m3 in hardware) on a CUDA device (ids
    "...-gpu": the interpreter run below leaves them out)."""
    return [*((b, "cpu") for b in cpu_backends()),
            *(pytest.param(b, "cuda", marks=pytest.mark.cuda, id=f"{b}-gpu") for b in ("cuda", "triton"))]


def trajectory(backend, cls, param_dtype, state_dtype, device="cpu", steps=STEPS, **kwargs):
    """Params after ``steps`` steps of a fixed problem; float64 params give the ground truth."""
    gen = torch.Generator().manual_seed(0)
    init = [INIT_SCALE * torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(steps)]
    params = [torch.nn.Parameter(x.to(param_dtype).to(device)) for x in init]
    frozen = torch.nn.Parameter(torch.randn(5, generator=gen).to(device), requires_grad=False)
    frozen_before = frozen.detach().clone()
    opt = cls([*params, frozen], backend=backend, state_dtype=state_dtype, **kwargs)
    for t in range(steps):
        for i, p in enumerate(params):
            # parameter 1 gets no grad on step 2; low-precision grads are rounded like the params
            p.grad = None if (i == 1 and t == 2) else grads[t][i].to(param_dtype).to(device)
        refresh_hessian(opt, t)
        opt.step()
    assert torch.equal(frozen, frozen_before) and frozen not in opt.state
    return [p.detach().cpu() for p in params]


def refresh_hessian(opt, t):
    """Sophia: fold the step's own grads in as Hessian estimates every other step (from step 1, so that
    step 0 takes the h = 0 path)."""
    if isinstance(opt, fastopt.Sophia) and t % 2 == 1:
        opt.update_hessian()


def truth(cls, param_dtype, **kwargs):
    """The float64 reference, starting from the same (rounded) params and grads."""
    gen = torch.Generator().manual_seed(0)
    init = [(INIT_SCALE * torch.randn(s, generator=gen)).to(param_dtype).double() for s in SHAPES]
    grads = [[torch.randn(s, generator=gen).to(param_dtype).double() for s in SHAPES] for _ in range(STEPS)]
    params = [torch.nn.Parameter(x) for x in init]
    opt = cls(params, backend="torch", **kwargs)
    for t in range(STEPS):
        for i, p in enumerate(params):
            p.grad = None if (i == 1 and t == 2) else grads[t][i].clone()
        refresh_hessian(opt, t)
        opt.step()
    return [p.detach() for p in params]


def assert_within_rule(fast, plain, exact, param_dtype):
    for i, (f, p, e) in enumerate(zip(fast, plain, exact)):
        err_fast = (f.double() - e).abs().max().item()
        err_plain = (p.double() - e).abs().max().item()
        atol = 1e-6 if param_dtype == torch.float32 else torch.finfo(param_dtype).eps * e.abs().max().item()
        assert err_fast <= 2 * err_plain + atol, (
            f"tensor {i} {tuple(e.shape)}: fast error {err_fast:.3g} > 2 x plain error {err_plain:.3g} + {atol:.2g}")


# every element-wise rule and option that changes the kernel's code path
RULES = {
    "adamw": (fastopt.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adamw-amsgrad": (fastopt.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    "nadamw": (fastopt.NAdamW, dict(lr=1e-2, weight_decay=0.1)),
    "nadamw-amsgrad": (fastopt.NAdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    "adamw-cautious": (fastopt.AdamW, dict(lr=1e-2, weight_decay=0.1, cautious=True)),
    "nadamw-cautious": (fastopt.NAdamW, dict(lr=1e-2, weight_decay=0.1, cautious=True)),
    "lion": (fastopt.Lion, dict(lr=1e-3, weight_decay=1.0)),
    "lion-cautious": (fastopt.Lion, dict(lr=1e-3, weight_decay=1.0, cautious=True)),
    "mars": (fastopt.MARS, dict(lr=1e-2, weight_decay=0.1)),  # 1-D tensors take AdamW
    "mars-1d-amsgrad": (fastopt.MARS, dict(lr=1e-2, weight_decay=0.1, optimize_1d=True, amsgrad=True)),
    "mars-cautious": (fastopt.MARS, dict(lr=1e-2, weight_decay=0.1, cautious=True)),
    "sophia": (fastopt.Sophia, dict(lr=1e-2, weight_decay=0.1, bs=200)),  # both sides of the clip
}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("param_dtype", PARAM_DTYPES)
@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
@pytest.mark.parametrize("rule", RULES)
def test_backend_matches_reference(backend, param_dtype, state_dtype, rule):
    cls, kwargs = RULES[rule]
    fast = trajectory(backend, cls, param_dtype, state_dtype, **kwargs)
    plain = trajectory("torch", cls, param_dtype, state_dtype, **kwargs)
    assert_within_rule(fast, plain, truth(cls, param_dtype, **kwargs), param_dtype)


def adam_mini_trajectory(backend, param_dtype, state_dtype):
    """Params after STEPS steps of Adam-mini on its test model (tests/test_adam_mini.py): full-AdamW,
    per-head, per-row and per-tensor blocks."""
    from test_adam_mini import DIM, HEADS, KV_HEADS, SHAPES, named_params

    named = named_params(param_dtype)
    opt = fastopt.AdamMini(named, lr=1e-2, weight_decay=0.1, dim=DIM, n_heads=HEADS, n_kv_heads=KV_HEADS,
                           backend=backend, state_dtype=state_dtype)
    gen = torch.Generator().manual_seed(2)
    for _ in range(STEPS):
        for name, p in named:
            p.grad = torch.randn(SHAPES[name], generator=gen).to(param_dtype)
        opt.step()
    return [p.detach().cpu() for _, p in named]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("param_dtype", PARAM_DTYPES)
@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
def test_adam_mini_backend_matches_reference(backend, param_dtype, state_dtype):
    fast = adam_mini_trajectory(backend, param_dtype, state_dtype)
    plain = adam_mini_trajectory("torch", param_dtype, state_dtype)
    assert_within_rule(fast, plain, adam_mini_exact(param_dtype), param_dtype)


def adam_mini_exact(param_dtype):
    """The float64 reference from the params and grads rounded to ``param_dtype``."""
    from test_adam_mini import DIM, HEADS, KV_HEADS, SHAPES, named_params

    named = [(n, torch.nn.Parameter(p.detach().to(param_dtype).double())) for n, p in named_params(torch.float32)]
    opt = fastopt.AdamMini(named, lr=1e-2, weight_decay=0.1, dim=DIM, n_heads=HEADS, n_kv_heads=KV_HEADS,
                           backend="torch")
    gen = torch.Generator().manual_seed(2)
    for _ in range(STEPS):
        for name, p in named:
            p.grad = torch.randn(SHAPES[name], generator=gen).to(param_dtype).double()
        opt.step()
    return [p.detach() for _, p in named]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cls", [fastopt.AdamW, fastopt.Lion, fastopt.MARS, fastopt.Sophia])
@pytest.mark.parametrize("options", [
    dict(maximize=True), dict(lr=torch.tensor(3e-3)), dict(betas=(0.5, 0.6), weight_decay=0.0)])
def test_backend_options(backend, cls, options):
    kwargs = dict(lr=1e-2, weight_decay=0.1) | options
    fast = trajectory(backend, cls, torch.float32, "fp32", **kwargs)
    plain = trajectory("torch", cls, torch.float32, "fp32", **kwargs)
    assert_within_rule(fast, plain, truth(cls, torch.float32, **kwargs), torch.float32)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16])
def test_master_weights(backend, param_dtype):
    """With fp32 master weights, bf16/fp16 params are the rounded fp32 trajectory."""
    kwargs = dict(lr=1e-3, weight_decay=0.1)
    fast = trajectory(backend, fastopt.AdamW, param_dtype, "fp32", master_weights=True, **kwargs)
    exact = truth(fastopt.AdamW, param_dtype, **kwargs)
    for f, e in zip(fast, exact):
        # one rounding of a nearly exact fp32 value: within one ulp of the param dtype
        assert ((f.double() - e).abs() <= torch.finfo(param_dtype).eps * e.abs() + 1e-7).all()


@pytest.mark.parametrize("backend", ["torch", *cpu_backends()])
def test_stochastic_rounding_is_unbiased(backend):
    """Rounding bf16 params stochastically: the mean over many elements tracks the fp32 trajectory,
    where round-to-nearest stalls (1 - 1e-4 rounds back to 1.0 every step)."""
    n, lr = 1 << 16, 1e-4
    start = torch.full((n,), 1.0)
    grad = torch.full((n,), 1.0)
    outs = {}
    for sr in (False, True):
        p = torch.nn.Parameter(start.to(torch.bfloat16))
        opt = fastopt.AdamW([p], lr=lr, weight_decay=0.0, backend=backend, stochastic_rounding=sr)
        for _ in range(10):
            p.grad = grad.to(torch.bfloat16)
            opt.step()
        outs[sr] = p.detach().float()
    exact = 1.0 - 10 * lr  # Adam's steps are lr·sign(g) for a constant gradient
    assert outs[False].unique().numel() == 1 and abs(outs[False][0].item() - exact) > 5e-4  # RNE stalls at 1.0
    assert abs(outs[True].mean().item() - exact) < 2e-5
    assert outs[True].max() <= 1.0 and outs[True].min() >= 1.0 - 4 * 2**-8  # a few ulps of random walk


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("param_dtype", PARAM_DTYPES)
@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
@pytest.mark.parametrize("rule", RULES)
def test_gpu_backend_matches_reference(backend, param_dtype, state_dtype, rule):
    cls, kwargs = RULES[rule]
    fast = trajectory(backend, cls, param_dtype, state_dtype, device="cuda", **kwargs)
    plain = trajectory("torch", cls, param_dtype, state_dtype, **kwargs)
    assert_within_rule(fast, plain, truth(cls, param_dtype, **kwargs), param_dtype)


# more tensors than one launch takes (the CUDA engine: 20), and a 9M-element matrix: more chunks than the GPU
# holds CTAs, so that CTAs take several chunks, of several tensors
LAUNCH_SHAPES = [(3000, 3001), (768, 3072)] + [(64, 65), (4097,), (5,)] * 9 + [(1,)]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
# not MARS in fp8: its clip factor's norm is summed in another order than the torch path's (per-chunk fp64 sums
# against torch's fp32 reduction), and an ulp there moves single e4m3 codes at rounding boundaries, a quantum (up to
# 2^-3) of an element's moment; on 2.4M-element tensors that broke the rule on an H200 (2.5x the plain error). The
# small-shape matrix above covers MARS in fp8.
@pytest.mark.parametrize("rule, state_dtype", [("adamw", "fp32"), ("adamw", "fp8"), ("adamw-cautious", "fp32"),
                                               ("adamw-cautious", "fp8"), ("mars", "fp32")])
def test_gpu_launches_cover_every_chunk(backend, state_dtype, rule):
    """Many tensors, one far larger than a wave of CTAs: every element moves on the first step (no chunk skipped),
    and two steps stay within the tolerance rule of the float64 reference (the plain path: the torch backend on
    the same GPU); the cautious count and MARS's norm add up over chunks that different CTAs update."""
    cls, kwargs = RULES[rule]
    gen = torch.Generator().manual_seed(3)
    init = [INIT_SCALE * torch.randn(s, generator=gen) for s in LAUNCH_SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in LAUNCH_SHAPES] for _ in range(2)]
    results = {}
    for name, dtype, backend_name in (("fast", torch.float32, backend), ("plain", torch.float32, "torch"),
                                      ("exact", torch.float64, "torch")):
        params = [torch.nn.Parameter(x.to("cuda", dtype)) for x in init]
        opt = cls(params, backend=backend_name, state_dtype=state_dtype if dtype == torch.float32 else "fp32",
                  **kwargs)
        for t, step_grads in enumerate(grads):
            for p, g in zip(params, step_grads):
                p.grad = g.to("cuda", dtype)
            opt.step()
            if t == 0 and name == "fast":
                moved = [bool((p.detach().cpu() != x).all()) for p, x in zip(params, init)]
                assert all(moved), [s for s, m in zip(LAUNCH_SHAPES, moved) if not m]
        results[name] = [p.detach().cpu() for p in params]
    assert_within_rule(results["fast"], results["plain"], results["exact"], torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("rule", ["adamw-cautious", "lion-cautious", "mars", "mars-cautious", "sophia"])
def test_gpu_step_never_synchronises_with_the_host(backend, rule):
    """MARS's per-tensor norm and Cautious's per-tensor mean are reduced on the device: a step (after the
    first, which allocates state) must not wait for the GPU, lr tensor and GradScaler scalars included."""
    cls, kwargs = RULES[rule]
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in [(300, 700), (4097,), (5,)]]
    opt = cls(params, backend=backend, state_dtype="fp8", **dict(kwargs, lr=torch.tensor(1e-3, device="cuda")))
    assert_second_step_never_synchronises(opt, params)


def assert_second_step_never_synchronises(opt, params):
    """After a first step (which allocates state), a step with GradScaler's scalars set raises if it waits for
    the GPU (torch.cuda.set_sync_debug_mode("error"))."""
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.grad_scale, opt.found_inf = torch.tensor(2.0, device="cuda"), torch.tensor(0.0, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_triton_backend_through_the_optimizers_under_the_interpreter():
    """The triton rows above (and the triton tests of test_optimizer, torch.compile, test_muon (Muon / Scion /
    ROOT) and test_kron) run only when TRITON_INTERPRET=1 is set for the whole process (it is read when kernels are
    decorated), so this test runs them in a subprocess that sets it."""
    pytest.importorskip("triton")
    if backends.triton_interpreting():
        pytest.skip("this process runs the triton rows itself")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    here = os.path.dirname(__file__)
    others = [os.path.join(here, name) for name in ("test_optimizer.py", "test_muon.py", "test_kron.py")]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, *others,
                          "-k", "triton and not interpreter and not gpu"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1], run.stdout[-1000:]


def e4m3_midpoints() -> torch.Tensor:
    """The 126 midpoints between neighbouring non-negative e4m3 values (codes 0 .. 0x7E = 448): the rounding ties."""
    values = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return (values[:-1] + values[1:]) / 2


@pytest.mark.parametrize("backend, device", [("torch", "cpu"), *fp8_codec_backends()])
def test_fp8_codes_equal_the_reference_quantiser(backend, device):
    """With betas (0, 0) AdamW's new moments are g (but −0 → +0) and |g| = √(g²) exactly, so the stored codes and
    scales must be fastopt.state.quantize_e4m3 of g and |g| bit for bit: blocks of signed values over ten decades
    (many land on e4m3's subnormals or round to 0 after scaling), ±0, a block whose values scale onto a 2^-10 grid
    (halfway between e4m3 values: round-to-nearest-even ties), blocks of scale 1 holding every midpoint between
    neighbouring e4m3 values and the floats just above and below it (the AVX-512 encoder rounds through fp16 with a
    sticky bit: these are where that could go wrong), an all-zero block, and a last block of 53."""
    from fastopt.state import quantize_e4m3

    gen = torch.Generator().manual_seed(11)
    n = 4405  # fp8 state from 4096 elements on; the last block holds 53: three vectors of 16 and 5 more
    g = torch.randn(n, generator=gen) * 10.0 ** torch.randint(-6, 4, (n,), generator=gen)
    g[:256] = 0.0  # an all-zero block
    g[256:300] = torch.tensor([0.0, -0.0]).repeat(22)
    g[300:556] = torch.arange(256) * 2.0 ** -9 - 0.25
    g[556] = 448.0 * 2  # block 2's absmax: scale 2, so its values from g[512:556] halve onto a 2^-10 grid
    g[1000] = float("nan")  # block 3: a NaN scale, the NaN code 0x7F for the NaN (for |g|'s roots too), 0 or -0 else
    mids = e4m3_midpoints()
    near = torch.cat([mids, mids.nextafter(torch.tensor(math.inf)), mids.nextafter(torch.tensor(0.0))])
    for block, sign in ((5, 1.0), (6, 1.0), (7, -1.0), (8, -1.0)):  # 378 values over two blocks of 256, each ±
        part = near[:255] if block % 2 else near[255:]
        g[block * 256:block * 256 + part.numel()] = sign * part
        g[block * 256 + 255] = sign * 448.0  # absmax 448: scale 1, the values encode as they are
    p = torch.nn.Parameter(torch.zeros(n, device=device))
    p.grad = g.to(device)
    opt = fastopt.AdamW([p], lr=0.0, betas=(0.0, 0.0), weight_decay=0.0, backend=backend, state_dtype="fp8",
                        block_size=256)
    opt.step()
    state = {name: value.cpu() for name, value in opt.state[p].items()}
    for name, value in (("exp_avg", g + 0.0), ("exp_avg_sq", g.abs())):  # 0·m + (−0) is +0
        codes, scales = quantize_e4m3(value, 256)
        assert torch.equal(state[name].view(torch.uint8), codes.view(torch.uint8)), name
        assert torch.equal(state[f"{name}_scale"].isnan(), scales.isnan()) and scales[3].isnan(), name
        assert torch.equal(state[f"{name}_scale"].nan_to_num(), scales.nan_to_num()), name


@pytest.mark.parametrize("backend, device", fp8_codec_backends())
def test_fp8_codes_just_off_rounding_ties(backend, device):
    """Every midpoint between neighbouring e4m3 values, moved up and down by one float32 bit at each position below
    its round bit, encodes as fastopt.state.quantize_e4m3 (exp_avg with betas (0, 0) is the gradient; blocks of
    scale 1). Only that one bit tells such a value from the tie, so an encoder that loses a bit the rounding needs
    (the AVX-512 encoder truncates to fp16, which drops bits 0-12, and more on e4m3's subnormals) rounds it wrong."""
    from fastopt.state import quantize_e4m3

    mids = e4m3_midpoints().view(torch.int32)
    offsets = (1 << torch.arange(19, dtype=torch.int32)).repeat_interleave(2) * torch.tensor([1, -1]).repeat(19)
    values = (mids[:, None] + offsets).flatten().view(torch.float32)
    values = values[values.abs() < 448.0]  # the 255th midpoint moved up is no longer below the top code
    blocks = -(-values.numel() // 255)
    body = torch.zeros(blocks * 255)
    body[:values.numel()] = values
    g = torch.cat([body.view(blocks, 255), torch.full((blocks, 1), 448.0)], dim=1)  # absmax 448 in each: scale 1
    g[1::2] *= -1
    g = torch.cat([g.flatten(), torch.zeros(4096)])  # fp8 state from 4096 elements on
    p = torch.nn.Parameter(torch.zeros(g.numel(), device=device))
    p.grad = g.to(device)
    opt = fastopt.AdamW([p], lr=0.0, betas=(0.0, 0.0), weight_decay=0.0, backend=backend, state_dtype="fp8",
                        block_size=256)
    opt.step()
    codes, scales = quantize_e4m3(g + 0.0, 256)
    assert torch.equal(opt.state[p]["exp_avg"].cpu().view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(opt.state[p]["exp_avg_scale"].cpu(), scales)


def test_cpu_step_counters_advance_in_place_in_one_call():
    """fastopt::advance_steps_, the cpu backend's step counters (torch._foreach_add_ dispatches per CPU tensor): each
    one-element float32 tensor, 0-d or not, is advanced by ``by`` in place; anything else is refused, naming why.
    Through the optimizer: a parameter without a grad keeps its count, and GradScaler's skipped step counts nothing."""
    if not backends.probe("cpu").available:
        pytest.skip("the cpu backend is not built here")
    steps = [torch.tensor(float(i)) for i in range(4)] + [torch.zeros(1)]
    torch.ops.fastopt.advance_steps_(steps, 1.0)
    torch.ops.fastopt.advance_steps_(steps[:2], -0.5)
    assert [float(s) for s in steps] == [0.5, 1.5, 3.0, 4.0, 1.0]
    for bad in (torch.zeros((), dtype=torch.float64), torch.zeros(2)):
        with pytest.raises(RuntimeError, match="one-element float32 CPU tensors"):
            torch.ops.fastopt.advance_steps_([torch.zeros(()), bad], 1.0)
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(5000))
    opt = fastopt.AdamW([a, b], backend="cpu", state_dtype="fp8")
    a.grad, b.grad = torch.ones(3), torch.ones(5000)
    opt.step()
    b.grad = None
    opt.step()
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert float(opt.state[a]["step"]) == 2.0 and float(opt.state[b]["step"]) == 1.0


@pytest.mark.parametrize("block_size", [32, 256, 4096])
def test_cpu_fp8_codes_of_many_tensors_on_two_threads(block_size):
    """The cpu engine encodes each fp8 block while the thread's next block is updated (fp8_block.h, LaggedEncoder):
    every block's codes and scale must still be the reference quantiser's, whichever tensor, thread or partial last
    group the next block belongs to. AdamW with amsgrad and betas (0, 0) writes three moments, g, |g| and |g|
    (roots), so the state is fastopt.state.quantize_e4m3 of the gradient, bit for bit; tensors of odd sizes, on two
    threads."""
    from fastopt.state import quantize_e4m3

    if not backends.probe("cpu").available:
        pytest.skip("the cpu backend is not built here")
    gen = torch.Generator().manual_seed(3)
    sizes = [4097, 5000, 70001, 4096 + 31, 12345]
    params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
    for p in params:
        p.grad = torch.randn(p.numel(), generator=gen) * 10.0 ** torch.randint(-3, 3, (p.numel(),), generator=gen)
    opt = fastopt.AdamW(params, lr=0.0, betas=(0.0, 0.0), weight_decay=0.0, amsgrad=True, backend="cpu",
                        state_dtype="fp8", block_size=block_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        opt.step()
    finally:
        torch.set_num_threads(threads)
    for p in params:
        for name, value in (("exp_avg", p.grad + 0.0), ("exp_avg_sq", p.grad.abs()), ("max_exp_avg_sq", p.grad.abs())):
            codes, scales = quantize_e4m3(value, block_size)
            assert torch.equal(opt.state[p][name].view(torch.uint8), codes.view(torch.uint8)), (p.numel(), name)
            assert torch.equal(opt.state[p][f"{name}_scale"], scales), (p.numel(), name)


@pytest.mark.parametrize("backend, device", fp8_codec_backends())
def test_fp8_codes_at_rounding_ties_under_extreme_scales(backend, device):
    """Blocks whose values scale exactly onto the midpoints between e4m3 values (round-to-nearest-even ties) encode
    as fastopt.state.quantize_e4m3 (exp_avg with betas (0, 0): the gradient itself), under absmax values where
    448 / absmax needs a true division (448.0 / tensor, reciprocal × 448, is an ulp off there: the reference
    quantiser once took it), and above ~1.5e38, where 448 / absmax · 2^-8 is a subnormal float, too coarse for the
    AVX-512 encoder's fp16 path: it hands such a block to the scalar encoder."""
    from fastopt.state import quantize_e4m3

    mids = e4m3_midpoints()[8:]  # between normal e4m3 values
    absmaxes = (3e38, 1.6e38, 1e-20, 1e30)
    g = torch.zeros(len(absmaxes) * 256)
    for block, absmax in enumerate(absmaxes):
        inv = torch.tensor(448.0) / absmax  # float32, as the kernels divide
        near = (mids.double() / inv.double()).float()
        candidates = [near]
        for direction in (math.inf, -math.inf):
            x = near
            for _ in range(3):
                x = x.nextafter(torch.tensor(direction))
                candidates.append(x)
        candidates = torch.stack(candidates)
        ties = candidates[candidates * inv == mids].unique()
        assert ties.numel() > 50
        g[block * 256] = absmax
        g[block * 256 + 1:block * 256 + 1 + ties.numel()] = ties * (-1) ** block
    p = torch.nn.Parameter(torch.zeros(g.numel() + 4096, device=device))  # fp8 state from 4096 elements on
    p.grad = torch.cat([g, torch.zeros(4096)]).to(device)
    opt = fastopt.AdamW([p], lr=0.0, betas=(0.0, 0.0), weight_decay=0.0, backend=backend, state_dtype="fp8",
                        block_size=256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # g² overflows: exp_avg_sq is not checked here
        opt.step()
    codes, scales = quantize_e4m3(p.grad.cpu() + 0.0, 256)
    assert torch.equal(opt.state[p]["exp_avg"].cpu().view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(opt.state[p]["exp_avg_scale"].cpu(), scales)


@pytest.mark.parametrize("backend, device", fp8_codec_backends())
def test_fp8_state_decodes_every_code_as_the_reference(backend, device):
    """With β1 = β2 = 1 a step keeps each moment's value (m + 0·(g − m); 1·r² + 0·g², whose root is r again),
    so the new state is the decoded state encoded again, and must equal the torch backend's bit for bit (it
    decodes with fastopt.state.dequantize_e4m3): every signed code (0x7F / 0xFF read as NaN, in a block of
    their own) and every root code below 0x7F, under scales from 2^-50 to 2^51 (r² stays a normal float) and
    off powers of two, in whole vector groups and in a last block of 45 elements. On a GPU the sign of a NaN
    (its arithmetic returns the canonical NaN) and, in Triton's compiled code, of a zero moment is not kept: there
    the NaN codes 0x7F / 0xFF and the zero codes 0x00 / 0x80 compare equal (an H200: Triton wrote +0 for 15 of
    the −0 moments)."""
    from fastopt.ops.adam import adam_step

    gen = torch.Generator().manual_seed(5)
    n, block = 4096 + 256 * 3 + 45, 256
    blocks = -(-n // block)
    signed = torch.cat([torch.arange(0x7F), torch.arange(0x80, 0xFF)])  # 254 non-NaN codes
    m_codes = torch.cat([signed[torch.randperm(254, generator=gen)][:block] for _ in range(2 * blocks)])[:n]
    m_codes[-45:-40] = torch.tensor([0x7F, 0xFF, 0x00, 0x80, 0x01])  # the NaN codes: the last block only
    v_codes = torch.randint(0, 0x7F, (n,), generator=gen)  # roots: magnitude codes, never 0x7F
    scales = [2.0 ** torch.randint(-50, 50, (blocks,), generator=gen) * (1 + torch.rand(blocks, generator=gen))
              for _ in range(2)]
    grad = torch.randn(n, generator=gen)
    results = {}
    for b, dev in (("torch", "cpu"), (backend, device)):
        m, v = (codes.to(torch.uint8).view(torch.float8_e4m3fn).to(dev) for codes in (m_codes, v_codes))
        m_scale, v_scale = (s.to(dev, copy=True) for s in scales)
        adam_step(b, [torch.zeros(n, device=dev)], [grad.to(dev)], [m], [v], [], [m_scale], [v_scale], [], [],
                  [torch.tensor(1.0, device=dev)], None, 0.0, 1.0, 1.0, 1e-8, 0.0, False, False, False, block, -1,
                  None, None)
        results[b] = tuple(x.cpu() for x in (m.view(torch.uint8), v.view(torch.uint8), m_scale, v_scale))
    expected, got = results["torch"], results[backend]
    if device == "cuda":
        signless = [torch.where(t == 0xFF, 0x7F, torch.where(t == 0x80, 0, t)) for t in (*expected[:2], *got[:2])]
        expected, got = (*signless[:2], *expected[2:]), (*signless[2:], *got[2:])
    assert torch.isnan(expected[2][-1]) and torch.isfinite(expected[2][:-1]).all()  # the NaN block, only
    for x, y in zip(got, expected):
        assert torch.equal(x.nan_to_num(), y.nan_to_num()) and torch.equal(x.isnan(), y.isnan())


@pytest.mark.parametrize("backend", ["torch", *cpu_backends()])
def test_fp8_nan_poisons_its_block_only(backend):
    """A NaN gradient gives a NaN parameter element, as in torch; in fp8 state the NaN makes its
    block's scale NaN (the block reads back as NaN) and leaves the other blocks alone."""
    from fastopt.state import dequantize_e4m3

    p = torch.nn.Parameter(torch.randn(8192))
    grad = torch.randn(8192)
    grad[300] = float("nan")
    p.grad = grad
    opt = fastopt.AdamW([p], backend=backend, state_dtype="fp8", block_size=256)
    opt.step()
    assert torch.isnan(p[300]) and torch.isfinite(p[:300]).all() and torch.isfinite(p[301:]).all()
    state = opt.state[p]
    m = dequantize_e4m3(state["exp_avg"], state["exp_avg_scale"], 256)
    assert torch.isnan(m[256:512]).all()
    assert torch.isfinite(m[:256]).all() and torch.isfinite(m[512:]).all()
