"""Muon against torch.optim.Muon and its equations; its AdamW side; the EMA/sum momentum equivalence."""

import math

import pytest
import torch

import fastopt
from fastopt.ops import newton_schulz


def matrices(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in [(32, 48), (48, 32), (32, 48)]]


def grads(params, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params] for _ in range(steps)]


def run(opt, params, gs):
    for g in gs:
        for p, gp in zip(params, g):
            p.grad = gp.clone()
        opt.step()


def muon_by_hand(params, gs, lr, wd, mu, nesterov, steps, adjust):
    """torch.optim.Muon's update in fp64 with fastopt's fp64 Newton-Schulz reference."""
    ps = [p.detach().clone().double() for p in params]
    bufs = [torch.zeros_like(p) for p in ps]
    for g in gs:
        for i, gi in enumerate(g):
            gi = gi.double()
            bufs[i] = bufs[i].lerp(gi, 1 - mu)
            m = gi.lerp(bufs[i], mu) if nesterov else bufs[i]
            o = newton_schulz(m, steps=steps, backend="torch", precision="fp64")
            rows, cols = ps[i].shape
            scale = math.sqrt(max(1, rows / cols)) if adjust is None else 0.2 * math.sqrt(max(rows, cols))
            ps[i] = ps[i] * (1 - lr * wd) - lr * scale * o
    return ps


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust", [None, "match_rms_adamw"])
def test_matches_its_equations_in_fp64(nesterov, adjust):
    params = matrices(dtype=torch.float64)
    gs = grads(params, 4)
    expected = muon_by_hand(params, gs, 0.02, 0.1, 0.9, nesterov, 5, adjust)
    opt = fastopt.Muon(params, lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust,
                       backend="torch")
    run(opt, params, gs)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14)


def test_close_to_torch_optim_muon():
    """torch's Muon runs its NS in bf16 from a bf16 copy of the momentum: within bf16 noise of fastopt's bf16 engine."""
    ours, theirs = matrices(), matrices()
    gs = grads(ours, 5)
    run(fastopt.Muon(ours, lr=0.02, backend="cpu"), ours, gs)
    run(torch.optim.Muon(theirs, lr=0.02), theirs, gs)
    start = matrices()
    for a, b, s in zip(ours, theirs, start):
        moved = (b - s).norm()
        assert (a - b).norm() < 0.05 * moved  # 5% of the distance travelled
    # fp32 engine against the fp64 equations: tight
    fp32 = matrices()
    run(fastopt.Muon(fp32, lr=0.02, backend="cpu", ns_precision="fp32"), fp32, gs)
    for a, e in zip(fp32, muon_by_hand(matrices(), gs, 0.02, 0.1, 0.95, True, 5, None)):
        torch.testing.assert_close(a.detach().double(), e, rtol=0, atol=2e-5)


def test_ema_and_sum_momentum_give_the_same_direction():
    """B ← μB + (1-μ)g (torch, Keller) and B ← μB + g: M differs by the factor 1-μ, which NS normalises away."""
    gen = torch.Generator().manual_seed(4)
    gs = [torch.randn(24, 40, generator=gen, dtype=torch.float64) for _ in range(6)]
    mu, ema, plain = 0.95, torch.zeros(24, 40, dtype=torch.float64), torch.zeros(24, 40, dtype=torch.float64)
    for g in gs:
        ema = ema.lerp(g, 1 - mu)
        plain = mu * plain + g
        m_ema, m_sum = g.lerp(ema, mu), g + mu * plain
        torch.testing.assert_close(m_ema, (1 - mu) * m_sum)
        torch.testing.assert_close(newton_schulz(m_ema, backend="torch", precision="fp64", eps=0.0),
                                   newton_schulz(m_sum, backend="torch", precision="fp64", eps=0.0))


def test_non_matrices_and_opted_out_groups_take_adamw():
    w = torch.nn.Parameter(torch.randn(16, 8))
    conv = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
    bias = torch.nn.Parameter(torch.randn(16))
    embed = torch.nn.Parameter(torch.randn(10, 8))
    opt = fastopt.Muon([{"params": [w, conv, bias]}, {"params": [embed], "use_muon": False, "lr": 1e-3}],
                       backend="cpu")
    for p in (w, conv, bias, embed):
        p.grad = torch.randn_like(p)
    opt.step()
    assert set(opt.state[w]) == set(opt.state[conv]) == {"step", "momentum_buffer"}
    assert set(opt.state[bias]) == set(opt.state[embed]) == {"step", "exp_avg", "exp_avg_sq"}
    # the conv weight is orthogonalised as a (4, 27) matrix: its update has (near-)orthonormal rows
    before = conv.detach().clone()
    conv.grad = torch.randn_like(conv)
    opt2 = fastopt.Muon([conv], lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False, backend="cpu",
                        ns_precision="fp32")
    opt2.step()
    update = (before - conv.detach()).reshape(4, 27)
    s = torch.linalg.svdvals(update.double())
    assert 0.6 < s.min() and s.max() < 1.25


def test_bad_arguments():
    p = [torch.nn.Parameter(torch.randn(4, 4))]
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        fastopt.Muon(p, adjust_lr_fn="spectral")
    with pytest.raises(ValueError, match="ns_precision"):
        fastopt.Muon(p, ns_precision="fp8")
    with pytest.raises(ValueError, match="invalid momentum"):
        fastopt.Muon(p, momentum=1.0)


CLASSES = {"muon": fastopt.Muon, "scion": fastopt.Scion, "root": fastopt.ROOT}


def distance_from_torch_backend(name, backend, shapes, device="cpu", ns_precision="fp32"):
    """max over params of ‖p_backend − p_torch‖ / ‖p_torch − p_0‖ after two steps of optimizer ``name`` (the
    torch backend with the fp32 engine as the yardstick)."""
    precision = (lambda v: {"ns_dtype": v}) if name == "root" else (lambda v: {"ns_precision": v})
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen).to(device) for s in shapes]
    results = {}
    for run_backend, run_precision in (("torch", "fp32"), (backend, ns_precision)):
        ps = [torch.nn.Parameter(p.clone()) for p in start]
        opt = CLASSES[name](ps, backend=run_backend, **precision(run_precision))
        run(opt, ps, [[g.to(device) for g in step] for step in grads([p.cpu() for p in ps], 2)])
        results[run_backend] = ps
    return max(((fast - ref).norm() / (ref - p0).norm()).item()
               for p0, ref, fast in zip(start, results["torch"], results[backend]))


@pytest.mark.parametrize("name", ["muon", "scion", "root"])
def test_triton_backend_matches_torch(name):
    """Muon, Scion and ROOT with backend="triton": Newton-Schulz (and ROOT's quantile clamp) in the Triton
    kernels, AdamW on the Triton element-wise kernel. CPU tensors under TRITON_INTERPRET=1 only: this runs
    in the subprocess of test_backends.py::test_triton_backend_through_the_optimizers_under_the_interpreter."""
    from fastopt import backends

    if not backends.triton_interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 for the whole process")
    shapes = [(24, 40), (40, 24), (16,)] if name != "scion" else [(24, 40), (40, 24)]
    assert distance_from_torch_backend(name, "triton", shapes) < 1e-4


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name", ["muon", "scion", "root"])
def test_gpu_backends_match_torch(name, backend):
    """On a GPU, the cuda and triton backends against the torch backend: same-shape matrices stacked into one
    batch, matrices of many kernel chunks (ROOT's clamp: 160k elements), a transposed shape and a vector (AdamW;
    Scion takes matrices only). The fp32 engine: tight; bf16: within bf16's noise."""
    from fastopt import backends

    if not (torch.cuda.is_available() and backends.probe(backend).available):
        pytest.skip(f"needs a CUDA device and the {backend} backend")
    shapes = [(256, 640), (256, 640), (640, 256), (48, 48)] + ([] if name == "scion" else [(300,)])
    assert distance_from_torch_backend(name, backend, shapes, "cuda") < 1e-4
    assert distance_from_torch_backend(name, backend, shapes, "cuda", "bf16") < 3e-2


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name", ["muon", "scion", "root"])
@pytest.mark.parametrize("state_dtype", ["fp32", "fp8"])
def test_gpu_step_never_synchronises(name, backend, state_dtype):
    """A step after the first (which allocates state) never waits for the GPU: the momentum pass (on triton the
    momentum kernel, M's norms on the device), Newton-Schulz, ROOT's clamp, the update."""
    from fastopt import backends

    if not (torch.cuda.is_available() and backends.probe(backend).available):
        pytest.skip(f"needs a CUDA device and the {backend} backend")
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in [(256, 640), (256, 640), (640, 256)]]
    opt = CLASSES[name](params, backend=backend, state_dtype=state_dtype)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if opt.state else "default")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def _momentum_cpu(bufs, scales, block_size, grads, direction_dtype, coefficients):
    """fastopt::momentum_direction_ (the C++ op, one tensor per call) on each tensor: (directions, sumsqs)."""
    from fastopt import backends

    assert backends.probe("cpu").available
    directions = [torch.empty(g.shape, dtype=direction_dtype) for g in grads]
    sumsqs = torch.empty(len(grads), dtype=torch.float64)
    for i, (b, g, d) in enumerate(zip(bufs, grads, directions)):
        torch.ops.fastopt.momentum_direction_(b, scales[i] if scales else None, block_size, g, d, sumsqs[i],
                                              *coefficients)
    return directions, sumsqs


def _momentum_triton(bufs, scales, block_size, grads, direction_dtype, coefficients):
    """The Triton kernel's list form, one launch, in the interpreter (a private copy of the kernel module)."""
    pytest.importorskip("triton")
    from triton_testing import kernel_module

    directions = [torch.empty(g.shape, dtype=direction_dtype) for g in grads]
    sumsqs = torch.empty(len(grads), dtype=torch.float64)
    kernel_module("elementwise_step", True).momentum_direction(bufs, scales, block_size, grads, directions, sumsqs,
                                                               *coefficients)
    return directions, sumsqs


MOMENTUM_KERNELS = {"cpu": _momentum_cpu, "triton": _momentum_triton}
# sizes that end inside a vector group or a Triton chunk, fill one, and span several blocks / chunks
MOMENTUM_SHAPES = [(1,), (37,), (4096,), (3, 4096 + 5)]


@pytest.mark.parametrize("kernel", ["cpu", "triton"])
@pytest.mark.parametrize("buf_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("direction_dtype", [torch.float32, torch.bfloat16])
def test_momentum_direction_kernel_against_its_equations(kernel, buf_dtype, grad_dtype, direction_dtype):
    """The momentum kernels (fastopt::momentum_direction_ on CPU; the Triton list form, one launch for all the
    tensors): B ← β·B + γ·g, M = δ·g + ε·B, Σ M² per tensor."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen).to(grad_dtype) for s in MOMENTUM_SHAPES]
    bufs = [torch.randn(s, generator=gen).to(buf_dtype) for s in MOMENTUM_SHAPES]
    want_bufs = [0.9 * b.double() + 0.3 * g.double() for b, g in zip(bufs, grads)]
    directions, sumsqs = MOMENTUM_KERNELS[kernel](bufs, [], 1, grads, direction_dtype, (0.9, 0.3, 0.7, 1.1))
    for b, g, d, sumsq, want_buf in zip(bufs, grads, directions, sumsqs, want_bufs):
        want_m = 0.7 * g.double() + 1.1 * want_buf
        for got, want in ((b, want_buf), (d, want_m)):
            rtol = 2 ** -8 if got.dtype == torch.bfloat16 else 1e-6
            torch.testing.assert_close(got.double(), want, rtol=rtol, atol=1e-6)
        assert sumsq.item() == pytest.approx(want_m.square().sum().item(), rel=1e-5)


@pytest.mark.parametrize("skip", [None, 0.0, 1.0])
@pytest.mark.parametrize("optimizer", [fastopt.Muon, fastopt.ROOT])
def test_fp8_momentum_of_a_stack_equals_one_matrix_at_a_time(optimizer, skip):
    """The GPU backends' momentum pass loads and stores same-shape fp8 buffers as one stack (the reference quantiser
    once per shape): the codes, scales and directions must be those of one matrix at a time, bit for bit, for
    stacked shapes (numel a multiple of the block size), a shape whose blocks would straddle matrices, and a shape
    of one matrix; a GradScaler skip (found_inf) keeps every buffer."""
    from fastopt.optim.muon import momentum_steps

    gen = torch.Generator().manual_seed(5)
    shapes = [(16, 32), (33, 40), (16, 32), (8, 64), (33, 40), (16, 32)]
    grads = [torch.randn(s, generator=gen) * 10.0 ** torch.randint(-3, 2, s, generator=gen) for s in shapes]
    opt = optimizer([torch.nn.Parameter(torch.zeros(s)) for s in [(1, 1)]], state_dtype="fp8", block_size=32)
    group = opt.param_groups[0]

    def states():
        out = []
        for i, g in enumerate(grads):
            codes, scales = fastopt.state.quantize_e4m3(torch.randn(g.shape, generator=torch.Generator().manual_seed(i))
                                                        * (i + 1), 32)
            out.append({"momentum_buffer": codes, "momentum_buffer_scale": scales})
        return out

    found_inf = None if skip is None else torch.tensor(skip)
    args = (32, lambda b, g: opt._accumulate_(group, b, g), lambda g, b: opt._direction(group, g, b))
    stacked, alone = states(), states()
    before = [s["momentum_buffer"].clone() for s in stacked]
    got = momentum_steps(stacked, grads, found_inf, *args)
    want = [momentum_steps([s], [g], found_inf, *args)[0] for s, g in zip(alone, grads)]
    for a, b, d, e, old in zip(stacked, alone, got, want, before):
        assert torch.equal(a["momentum_buffer"].view(torch.uint8), b["momentum_buffer"].view(torch.uint8))
        assert torch.equal(a["momentum_buffer_scale"], b["momentum_buffer_scale"])
        assert torch.equal(d, e)
        if skip == 1.0:
            assert torch.equal(a["momentum_buffer"].view(torch.uint8), old.view(torch.uint8))
        else:
            assert not torch.equal(a["momentum_buffer"].view(torch.uint8), old.view(torch.uint8))


@pytest.mark.parametrize("kernel", ["cpu", "triton"])
@pytest.mark.parametrize("block_size", [32, 256, 4096])
def test_momentum_direction_kernel_fp8_buffer(kernel, block_size):
    """The momentum kernels with fp8 buffers: decoded with their block scales (β = 0.5 on a buffer of quantised
    values), and with β = 0, γ = 1 the new buffer is g, so its codes and scales must be
    fastopt.state.quantize_e4m3(g) bit for bit; M and Σ M² against their equations (Triton: a block of 4096 spans
    two chunks' worth of elements, the chunk grows to the block)."""
    from fastopt.state import dequantize_e4m3, quantize_e4m3

    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(s, generator=gen) * 10.0 ** torch.randint(-3, 3, s, generator=gen) for s in MOMENTUM_SHAPES]
    for beta in (0.0, 0.5):
        quantised = [quantize_e4m3(torch.randn(s, generator=gen), block_size) for s in MOMENTUM_SHAPES]
        codes, scales = [c for c, _ in quantised], [sc for _, sc in quantised]
        old = [dequantize_e4m3(c, sc, block_size).double() for c, sc in quantised]
        directions, sumsqs = MOMENTUM_KERNELS[kernel](codes, scales, block_size, grads, torch.float32,
                                                      (beta, 1.0, 0.3, 0.7))
        for g, c, sc, o, d, sumsq in zip(grads, codes, scales, old, directions, sumsqs):
            want_buf = beta * o + g.double()
            want_m = 0.3 * g.double() + 0.7 * want_buf
            if beta == 0.0:
                want_codes, want_scales = quantize_e4m3(g, block_size)
                assert torch.equal(c.view(torch.uint8), want_codes.view(torch.uint8))
                assert torch.equal(sc, want_scales)
            else:
                got = dequantize_e4m3(c, sc, block_size).double()
                torch.testing.assert_close(got, want_buf, rtol=2 ** -3, atol=sc.max().item() * 2 ** -9)
            torch.testing.assert_close(d.double(), want_m, rtol=1e-6, atol=1e-6)
            assert sumsq.item() == pytest.approx(want_m.square().sum().item(), rel=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("name, nesterov", [("muon", True), ("muon", False), ("root", True), ("root", False),
                                            ("scion", True)])  # (Scion has no Nesterov option)
@pytest.mark.parametrize("state_dtype", ["fp32", "bf16", "fp8"])
def test_momentum_pass_kernel_matches_the_torch_backend(backend, name, state_dtype, nesterov, monkeypatch):
    """On the cpu backend the momentum runs in fastopt::momentum_direction_ (B and M in one pass; Muon's and
    Scion's M in NS's operand dtype with its norm, which NS then folds into its first products) and the parameter
    update in fastopt::decayed_update_; on the triton backend in the Triton momentum kernel (one launch per buffer
    dtype, M in float32 with its norm; under TRITON_INTERPRET=1 only: test_backends.py runs it). Against the torch
    backend's lerp / add: buffers to float32 (bf16 storage: bf16) rounding, params within the fp32 engine's noise."""
    import fastopt.optim.muon as muon
    from fastopt import backends

    if backend == "triton" and not backends.triton_interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 for the whole process")
    # (muon.momentum_pass calls the kernel for all three); counted per param
    calls, entry = [], "momentum_direction" if backend == "cpu" else "momentum_directions"
    kernel = getattr(muon, entry)
    monkeypatch.setattr(muon, entry, lambda *a: (calls.extend(a[1] if backend == "triton" else [a[1]]),
                                                 kernel(*a))[1])
    precision = {"ns_dtype": "fp32"} if name == "root" else {"ns_precision": "fp32"}
    if name != "scion":
        precision["nesterov"] = nesterov
    gen = torch.Generator().manual_seed(0)
    large = (300, 600) if backend == "cpu" else (64, 96)  # fp8 storage from 4096 elements; the interpreter is slow
    start = [torch.randn(s, generator=gen) for s in [(24, 40), (40, 24), large]]
    results = {}
    for run_backend in ("torch", backend):
        ps = [torch.nn.Parameter(p.clone()) for p in start]
        opt = CLASSES[name](ps, backend=run_backend, state_dtype=state_dtype, **precision)
        run(opt, ps, grads(ps, 3))
        results[run_backend] = (ps, [opt.state[p]["momentum_buffer"] for p in ps])
    assert len(calls) == 3 * len(start)  # the kernel run's steps only
    (ref, ref_bufs), (fast, fast_bufs) = results["torch"], results[backend]
    for b_ref, b_fast in zip(ref_bufs, fast_bufs):
        assert b_fast.dtype == b_ref.dtype
        if b_ref.dtype == torch.float8_e4m3fn:  # (small tensors keep float32 state) the same codes but where float
            # rounding tips one
            assert (b_fast.view(torch.uint8) != b_ref.view(torch.uint8)).float().mean() < 1e-4
        else:
            rtol = 2 ** -7 if b_ref.dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(b_fast.float(), b_ref.float(), rtol=rtol, atol=1e-5)
    for p0, r, f in zip(start, ref, fast):
        assert ((f - r).norm() / (r - p0).norm()).item() < (1e-2 if state_dtype == "fp8" else 1e-4)


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("update_dtype", [torch.float32, torch.bfloat16])
def test_decayed_update_kernel_against_its_equation(param_dtype, update_dtype):
    """fastopt::decayed_update_ (CPU): p ← (1 − decay)·p − step·u, rounded to p's dtype once."""
    gen = torch.Generator().manual_seed(0)
    for n in (1, 37, 3 * 4096 + 5):
        p = torch.randn(n, generator=gen).to(param_dtype)
        u = torch.randn(n, generator=gen).to(update_dtype)
        want = ((1 - 0.01) * p.double() - 0.3 * u.double()).to(param_dtype)
        torch.ops.fastopt.decayed_update_(p, u, 0.01, 0.3)
        torch.testing.assert_close(p, want, rtol=1e-6 if param_dtype == torch.float32 else 2 ** -7, atol=1e-6)


def test_momentum_pass_norm_of_huge_directions():
    """The kernel's float32 block sums of M² overflow past |M| ~ 1e19: the norm is taken again in float64, so
    Newton-Schulz still gets ‖M‖ (and the same update as the torch backend), not inf."""
    from fastopt import backends
    from fastopt.optim.muon import momentum_direction

    assert backends.probe("cpu").available
    g = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * 1e25
    state = {"momentum_buffer": torch.zeros(64, 96)}
    direction, norm = momentum_direction(state, g, (0.9, 0.1, 0.1, 0.9), torch.bfloat16, 256)
    want = torch.linalg.vector_norm(direction, dtype=torch.float64)
    assert torch.isfinite(norm) and norm.item() == pytest.approx(want.item(), rel=1e-6)
    results = []
    for backend in ("torch", "cpu"):
        p = torch.nn.Parameter(torch.zeros(64, 96))
        p.grad = g.clone()
        fastopt.Muon([p], lr=0.1, weight_decay=0.0, ns_precision="fp32", backend=backend).step()
        results.append(p.detach())
    assert results[1].abs().max() > 0.01 and torch.allclose(results[0], results[1], atol=1e-4)
