"""The Newton-Schulz engine (fastopt.ops.newton_schulz) against its fp64 reference and the polar factor."""

import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastopt import reference
from fastopt.ops import newton_schulz
from fastopt.ops.newton_schulz import MUON, POLAR_EXPRESS, ROOT, cpu_batches, cpu_flops, cpu_form, flops, schedule


def gaussian(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def polar_factor(g):
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    return u @ vh


def decaying_spectrum(m, n, smallest, seed=0):
    """A (m, n) matrix with singular values spaced log-uniformly from 1 down to ``smallest``."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))
    return ((u * torch.logspace(0, torch.tensor(smallest).log10().item(), m, dtype=torch.float64)) @ v.T).float()


def check_against_the_fp64_reference(x, coefficients, backend):
    """fp32 within 1e-4 of the fp64 iteration; bf16 operands as good as the plain iteration in bf16 (the fused
    steps round less: usually better), up to 2% (bf16's cancellation in polar express's first step, whose terms
    are ~20x the result). Returns the fp32 result."""
    exact = newton_schulz(x.double(), coefficients=coefficients, backend="torch", precision="fp64")
    fp32 = newton_schulz(x, coefficients=coefficients, backend=backend, precision="fp32")
    bf16 = newton_schulz(x, coefficients=coefficients, backend=backend)
    assert fp32.dtype == bf16.dtype == torch.float32 and fp32.shape == x.shape
    relative = lambda y: ((y.double() - exact).norm() / exact.norm()).item()  # noqa: E731
    assert relative(fp32) < 1e-4
    plain = newton_schulz(x, coefficients=coefficients, backend="torch", precision="bf16")
    assert relative(bf16) <= 2 * relative(plain) + 0.02
    return fp32


# stacks of small matrices as one batch (min dim < 256), one at a time above; the dense form (small, square,
# or tall after the transpose) and the Gram form (wide, m ≥ 128), with
# symmetric products in 2 blocks from m = 512
@pytest.mark.parametrize("shape", [(48, 200), (3, 64, 64), (5, 1, 30), (200, 520), (2, 300, 260), (600, 600),
                                   (1100, 520)])
@pytest.mark.parametrize("coefficients", ["muon", "polar_express"])
def test_cpu_backend_matches_the_fp64_reference(shape, coefficients):
    check_against_the_fp64_reference(gaussian(*shape), coefficients, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(48, 200), (3, 64, 64), (5, 1, 30), (2, 300, 260), (1100, 520)])
@pytest.mark.parametrize("coefficients", ["muon", "polar_express"])
def test_cuda_backend_matches_the_fp64_reference(shape, coefficients):
    """cuBLAS: fp32 SYRKs (one triangle, mirrored) and bf16 batched GEMMs; batched == one by one; what ``auto``
    picks for CUDA tensors (no warning)."""
    x = gaussian(*shape).cuda()
    fp32 = check_against_the_fp64_reference(x, coefficients, "cuda")
    for i in range(x.shape[0] if x.ndim == 3 else 0):
        one = newton_schulz(x[i], coefficients=coefficients, backend="cuda", precision="fp32")
        torch.testing.assert_close(one, fp32[i], rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = newton_schulz(x, coefficients=coefficients)
    assert torch.equal(auto, newton_schulz(x, coefficients=coefficients, backend="cuda"))


def test_cpu_forms_and_their_flop_counts():
    assert [cpu_form(m, n, 5) for m, n in [(768, 3072), (3072, 768), (768, 768), (64, 256)]] == [
        "gram", "gram", "dense", "dense"]
    for precision in ("bf16", "fp32"):  # (the blocking depends on the dtype and the CPU)
        for m, n in [(768, 3072), (768, 768), (520, 1100)]:  # the counts are what the engine's matmuls do
            with FlopCounterMode(display=False) as counter:
                newton_schulz(gaussian(m, n), backend="cpu", precision=precision)
            assert counter.get_total_flops() == cpu_flops(m, n, 5, precision=precision)
    # at GPT-2 small's shapes, in fp32 (3 blocks at 768 on every CPU), the engine does 0.78x (768²) and 0.61x
    # (768x3072) of the plain iteration's FLOPs
    assert cpu_flops(768, 768, 5, precision="fp32") / flops(768, 768, 5) == pytest.approx(0.778, abs=1e-3)
    assert cpu_flops(768, 3072, 5, precision="fp32") / flops(768, 3072, 5) == pytest.approx(0.607, abs=1e-3)


@pytest.mark.parametrize("steps", [5, 10])
def test_gram_form_stays_as_accurate_as_the_plain_bf16_iteration(steps):
    """Singular values down to 1e-4: in bf16 the Gram matrix's smallest eigenvalues are rounding noise,
    and the negative ones grow each step; restarting every 2 steps keeps the error at the plain
    iteration's (every 3 diverged to 1e21 at 10 steps)."""
    x = decaying_spectrum(256, 1024, 1e-4)
    assert cpu_form(256, 1024, steps) == "gram"
    exact = newton_schulz(x.double(), steps=steps, backend="torch", precision="fp64")
    relative = lambda y: ((y.double() - exact).norm() / exact.norm()).item()  # noqa: E731
    gram = newton_schulz(x, steps=steps, backend="cpu")
    assert relative(gram) <= 1.2 * relative(newton_schulz(x, steps=steps, backend="torch", precision="bf16"))


@pytest.mark.parametrize("shape", [(4, 24, 40), (2, 260, 300)])  # one batched product; matrices one at a time
def test_batched_equals_one_by_one_and_transpose_commutes(shape):
    """Bit for bit; transposing too where the stack is one batched product (for matrices taken one at a time, the
    norm's reduction order follows the memory layout: the transpose agrees to rounding)."""
    x = gaussian(*shape)
    batched = newton_schulz(x, backend="cpu")
    for i in range(shape[0]):
        assert torch.equal(batched[i], newton_schulz(x[i], backend="cpu"))
    transposed = newton_schulz(x.mT.contiguous(), backend="cpu")
    if cpu_batches(*shape[1:]):
        assert torch.equal(transposed, batched.mT)
    else:
        torch.testing.assert_close(transposed, batched.mT, rtol=0, atol=2**-6)


@pytest.mark.parametrize("coefficients,band", [("muon", (0.65, 1.25)), ("polar_express", (0.85, 1.15))])
def test_singular_values_land_in_the_schedules_band(coefficients, band):
    """A wide Gaussian matrix: its normalised singular values start in [0.06, 0.19]; five steps bring them
    into the band the schedule is designed for (Muon's quintic oscillates in about [0.7, 1.2])."""
    x = gaussian(64, 256, seed=3)
    y = newton_schulz(x, coefficients=coefficients, backend="cpu", precision="fp32")
    s = torch.linalg.svdvals(y.double())
    assert band[0] <= s.min() and s.max() <= band[1], s
    # the direction is the polar factor U·Vᵀ: cosine similarity close to 1
    cos = (y.double() * polar_factor(x)).sum() / (y.double().norm() * polar_factor(x).norm())
    assert cos > 0.98


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_zero_tiny_and_huge_inputs_stay_finite(backend):
    x = gaussian(16, 32)
    assert torch.equal(newton_schulz(torch.zeros(16, 32), backend=backend), torch.zeros(16, 32))
    tiny = newton_schulz(x * 1e-30, backend=backend, precision="fp32")
    assert torch.isfinite(tiny).all() and tiny.abs().max() < 1e-15
    huge = newton_schulz(x * 1e30, backend=backend, precision="fp32")  # the fp32 squares would overflow
    torch.testing.assert_close(huge, newton_schulz(x, backend=backend, precision="fp32"), rtol=0, atol=1e-5)


def test_normalisation_without_host_sync_matches_the_cpu_one():
    """The GPU path's scaling (float64 norm, the factor in two float32 halves) on extreme inputs."""
    from fastopt.ops.newton_schulz import _normalised, _scaled_without_sync

    x = gaussian(3, 16, 32)
    for scale in (1.0, 1e-30, 1e30, 1e37, 0.0):
        cpu, _, _ = _normalised(x * scale, 1e-7, 1.0, torch.float32)
        gpu = _scaled_without_sync(x * scale, 1e-7, 1.0, torch.float32)
        assert torch.isfinite(gpu).all()
        torch.testing.assert_close(gpu, cpu, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cpu_workspace_is_never_returned(dtype):
    """The dense iteration's per-thread workspace holds every step but the last (and the last too where the result
    is then converted: a float32 input): results of consecutive calls (one step, several, a shape change in
    between) stay what they were."""
    x, z = gaussian(600, 600).to(dtype), gaussian(600, 600, seed=1).to(dtype)
    for steps in (1, 2, 5):
        first = newton_schulz(x, steps=steps, backend="cpu")
        kept = first.clone()
        second = newton_schulz(z, steps=steps, backend="cpu")
        newton_schulz(gaussian(520, 520), steps=steps, backend="cpu")
        assert torch.equal(first, kept) and not torch.equal(first, second)
        assert torch.equal(newton_schulz(x, steps=steps, backend="cpu"), kept)


@pytest.mark.parametrize("shape", [(600, 600), (300, 780), (1100, 520)])
def test_the_cpu_engine_folds_the_normalisation_into_its_products(shape):
    """A matrix is not rescaled first, only cast to the operand dtype (not even copied where it is in it): 1/‖X‖
    enters the first products' alpha and beta (dense and Gram forms, a tall matrix through its transpose); results
    as the fp64 iteration's. Small matrices (a batch's shapes) and a stack of them are scaled first."""
    from fastopt.ops.newton_schulz import _normalised

    x = gaussian(*shape) * 3.0
    y, _, scale = _normalised(x, 1e-7, 1.0, torch.float32, fold=True)
    assert y.data_ptr() == x.data_ptr() and scale == pytest.approx(1 / (x.double().norm().item() + 1e-7), rel=1e-5)
    y, _, scale = _normalised(x, 1e-7, 1.0, torch.bfloat16, fold=True)
    assert torch.equal(y, (x if x.size(0) <= x.size(1) else x.mT).bfloat16()) and scale != 1.0
    stack, _, scales = _normalised(torch.stack([x, 2 * x]), 1e-7, 1.0, torch.bfloat16, fold=True)
    assert scales == pytest.approx([scale, scale / 2], rel=1e-6)
    assert _normalised(gaussian(200, 520), 1e-7, 1.0, torch.float32, fold=True)[2] == 1.0
    exact = newton_schulz(x.double(), backend="torch", precision="fp64")
    relative = lambda y: ((y.double() - exact).norm() / exact.norm()).item()  # noqa: E731
    assert relative(newton_schulz(x, backend="cpu", precision="fp32")) < 1e-4
    folded, plain = newton_schulz(x.bfloat16(), backend="cpu"), newton_schulz(x.bfloat16(), backend="torch")
    assert folded.dtype == torch.bfloat16 and relative(folded) <= 2 * relative(plain) + 0.02
    assert _normalised(x * 1e-20, 1e-7, 1.0, torch.float32, fold=True)[2] == 1.0  # outside FOLD_NORMS: scaled


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_given_norm_replaces_the_engines_own(backend):
    """norm= (ROOT's clamp pass computes it): the engine divides by it instead of reducing X itself."""
    x = gaussian(3, 24, 40)
    own = torch.linalg.vector_norm(x, dim=(-2, -1), dtype=torch.float64 if backend == "torch" else None)
    assert torch.equal(newton_schulz(x, backend=backend, norm=own), newton_schulz(x, backend=backend))
    given = newton_schulz(x, backend=backend, precision="fp32", norm=2 * own)  # X / (2‖X‖): a smaller start
    want = reference.newton_schulz(x.double(), [MUON] * 5, 1e-7, dtype=torch.float64, norm=2 * own.double())
    torch.testing.assert_close(given, want.float(), rtol=0, atol=1e-4)
    assert not torch.allclose(given, newton_schulz(x, backend=backend, precision="fp32"), rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match=r"norm must be a real floating-point tensor of shape \(3,\)"):
        newton_schulz(x, backend=backend, norm=own[:2])


def test_schedules():
    assert schedule("muon", 5, (768, 768)) == ([MUON] * 5, 1.0, None)
    assert schedule("polar_express", 7, (8, 8)) == ([*POLAR_EXPRESS, POLAR_EXPRESS[-1], POLAR_EXPRESS[-1]], 1.02, 1e-6)
    assert schedule("root", 5, (3072, 2048))[0] == [ROOT[(2048, 3072)]] * 5
    assert schedule("root", 5, (768, 3072))[0] == [MUON] * 5
    assert schedule([(1.5, -0.5, 0.0)], 3, (2, 2))[0] == [(1.5, -0.5, 0.0)] * 3
    assert schedule([(1, 2, 3), (4, 5, 6)], 5, (2, 2))[0] == [(1, 2, 3), (4, 5, 6)]
    # one step of the cubic (1.5, -0.5, 0): σ ← 1.5σ - 0.5σ³, on a diagonal matrix by hand
    x = torch.diag(torch.tensor([0.6, 0.8], dtype=torch.float64))  # Frobenius norm 1
    y = newton_schulz(x, steps=1, coefficients=[(1.5, -0.5, 0.0)], eps=0.0, backend="torch", precision="fp64")
    torch.testing.assert_close(y.diagonal(), torch.tensor([1.5 * 0.6 - 0.5 * 0.216, 1.5 * 0.8 - 0.5 * 0.512],
                                                          dtype=torch.float64))
    assert flops(768, 3072, 5) == 5 * (4 * 768 * 768 * 3072 + 2 * 768 ** 3) == flops(3072, 768, 5)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(coefficients="cubic"), ValueError, "coefficients must be"),
    (dict(coefficients=[(1.0, 2.0)]), ValueError, "triples"),
    (dict(steps=0), ValueError, "steps"),
    (dict(precision="fp8"), ValueError, "precision"),
    (dict(backend="triton"), ValueError, "needs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1"),
    (dict(backend="cuda"), ValueError, "backend 'cuda' needs CUDA tensors"),
    (dict(backend="gpu"), ValueError, "backend must be"),
])
def test_bad_arguments(kwargs, error, match, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # backend="triton" on CPU tensors: only interpreted
    with pytest.raises(error, match=match):
        newton_schulz(gaussian(4, 4), **kwargs)
    with pytest.raises(ValueError, match="real floating-point"):
        newton_schulz(torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="real floating-point"):
        newton_schulz(torch.ones(2, 2, 2, 2))
