"""clamp_to_quantile (fastopt.ops.quantile_clamp): every backend against torch.quantile bit for bit — torch, cpu,
and the Triton radix select (triton_kernels/select.py) under the interpreter on CPU tensors — and real sm_80 / sm_90
compiles of the shipped kernel configurations.

Each mode of the kernel module gets its own private copy, executed with ``TRITON_INTERPRET`` set only while it is
imported (see tests/test_triton_elementwise_step.py for why); the triton backend's tests put the interpreted copy in
``sys.modules`` under the name the op imports, and set ``TRITON_INTERPRET=1`` so that the op accepts CPU tensors.
"""
import importlib
import re
import sys
import types

import pytest
import torch

from fastopt.backends import Probe
from fastopt.ops import clamp_to_quantile
from fastopt.ops import quantile_clamp as qc
from fastopt.ops.quantile_clamp import linear_rank

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from triton_testing import compile_check, compile_checks_in_subprocess, kernel_module  # noqa: E402

OP = importlib.import_module("fastopt.ops.quantile_clamp")
KERNELS = "fastopt.triton_kernels.select"
QS = (0.0, 0.5, 0.9, 1.0)
INF = float("inf")


def _kernel_module(interpret: bool):
    """The private copy of select.py; the interpreted one also has the test's lerp_kernel."""
    return kernel_module("select", interpret, lerp_kernel=_lerp_kernel)


def _lerp_kernel(lo_ptr, hi_ptr, w_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    lo, hi, w = (tl.load(p + offs, mask=mask, other=0.0) for p in (lo_ptr, hi_ptr, w_ptr))
    tl.store(out_ptr + offs, _kernel_module(True)._lerp(lo, hi, w), mask=mask)


@pytest.fixture
def interpreted(monkeypatch):
    """backend="triton" runs the interpreted kernels on CPU tensors."""
    monkeypatch.setitem(sys.modules, KERNELS, _kernel_module(True))
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# ----------------------------------------------------------------------------- inputs and the oracle
def _shuffle(values, shape, gen):
    """``values`` (1-D) in random order and with random signs, as a ``shape`` matrix."""
    signs = torch.randint(0, 2, values.shape, generator=gen) * 2 - 1
    return (values * signs)[torch.randperm(values.numel(), generator=gen)].view(shape)


def _case(name):
    """One fp32 test matrix (a few thousand elements: the interpreter is slow), by name."""
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    if name == "normal":  # 9100 elements: three kernel chunks; q(N-1) is fractional for q = 0.5
        return torch.randn(70, 130, generator=gen)
    if name == "ties":
        return (torch.randn(60, 70, generator=gen) * 3).round()
    if name == "constant":  # 2145 elements: q(N-1) is an integer for q = 0.5
        return torch.full((33, 65), -0.75)
    if name == "two_values":  # ranks floor/ceil(0.9 * 1999) = 1799, 1800 fall on either side of the jump
        return _shuffle(torch.cat([torch.full((1800,), 0.5), torch.full((200,), 3.0)]), (40, 50), gen)
    if name == "signed_zeros":
        return _shuffle(torch.cat([torch.zeros(1300), torch.randn(700, generator=gen)]), (50, 40), gen)
    if name == "huge_range":
        return _shuffle(10.0 ** (torch.rand(3000, generator=gen) * 60 - 30), (60, 50), gen)
    if name == "infinities":  # 120 of 2400 infinite: q = 1 lands on inf (a NaN threshold, as torch.quantile gives)
        return _shuffle(torch.cat([torch.randn(2280, generator=gen), torch.full((120,), INF)]), (48, 50), gen)
    if name == "single":
        return torch.tensor([[-2.5]])
    if name == "low_bits":  # 1024 values 1 + k 2^-23 share their top 22 bits: only the last radix pass parts them
        low = 1.0 + torch.arange(1024) * 2.0 ** -23
        return _shuffle(torch.cat([low, torch.rand(200, generator=gen) * 0.5, 2 + torch.rand(50, generator=gen)]),
                        (1274, 1), gen)
    raise ValueError(name)


CASES = ("normal", "ties", "constant", "two_values", "signed_zeros", "huge_range", "infinities", "single", "low_bits")


def expected(x, q, offset=1e-9):
    """torch.quantile(|x|, q, linear) + offset per matrix, in float32 (float64 for float64 input)."""
    c = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = x.reshape(-1, x.shape[-2] * x.shape[-1]).abs().to(c)
    return (torch.stack([torch.quantile(r, q, interpolation="linear") for r in rows]) + offset).view(x.shape[:-2])


def assert_same(a, b):
    """Equal dtype, shape and values, NaN where the other is NaN."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    nan = a.isnan()
    assert torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan]), (a, b)


def assert_norm(norm, clamped):
    """norm is the float64 Frobenius norm of each clamped matrix as returned (a float32 sum's rounding), NaN with
    NaN entries."""
    want = torch.linalg.vector_norm(clamped.double(), dim=(-2, -1))
    assert norm.dtype == torch.float64 and norm.shape == want.shape, (norm.dtype, norm.shape, want.shape)
    torch.testing.assert_close(norm, want, rtol=1e-5, atol=0, equal_nan=True)


def check(x, q, backend, offset=1e-9, out_dtype=None):
    """Threshold == torch.quantile + offset, clamped == torch.clamp(x, -t, t) in the threshold's dtype, cast, and the
    norm of the clamped matrices."""
    clamped, t, norm = clamp_to_quantile(x, q, offset, backend=backend, out_dtype=out_dtype, with_norm=True)
    want = expected(x, q, offset)
    assert_same(t, want)
    bound = want.view(-1, 1, 1) if x.ndim == 3 else want
    assert_same(clamped, torch.clamp(x.to(want.dtype), -bound, bound).to(out_dtype or x.dtype))
    assert_norm(norm, clamped)
    return clamped, t


BACKENDS = ("torch", "cpu", "triton")


# ----------------------------------------------------------------------------- exactness, every backend
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CASES)
def test_matches_torch_quantile(name, backend, request):
    if backend == "triton":
        request.getfixturevalue("interpreted")
    x = _case(name)
    for q in QS:
        check(x, q, backend)
    if name == "infinities":  # the rank lands among the infinities: a NaN threshold, like torch.quantile's
        assert clamp_to_quantile(x, 1.0, backend=backend)[1].isnan()


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_quantiles_and_offsets(backend, request):
    """q with fractional ranks of every size (w < 0.5 and w >= 0.5: both lerp forms), offset 0 and large."""
    if backend == "triton":
        request.getfixturevalue("interpreted")
    x = _case("normal")
    for q, offset in ((0.1, 0.0), (0.37, 1e-9), (0.77777, 0.5), (0.999, 1e-9), (1e-5, 0.0)):
        check(x, q, backend, offset)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_equals_one_by_one(backend, request):
    if backend == "triton":
        request.getfixturevalue("interpreted")
    gen = torch.Generator().manual_seed(3)
    x = torch.stack([torch.randn(40, 50, generator=gen), (torch.randn(40, 50, generator=gen) * 2).round(),
                     _case("two_values")])
    for q in (0.9, 0.5):
        clamped, t = check(x, q, backend)
        assert t.shape == (3,)
        for i in range(3):
            one_clamped, one_t = clamp_to_quantile(x[i], q, backend=backend)
            assert one_t.shape == ()
            assert_same(one_t, t[i])
            assert_same(one_clamped, clamped[i])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, out_dtype", [(torch.bfloat16, None), (torch.float16, None),
                                              (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                              (torch.float32, torch.float16), (torch.float16, torch.bfloat16)])
def test_low_precision_input_and_output(dtype, out_dtype, backend, request):
    """bf16 / fp16 inputs select on their own bits (fewer radix passes); the output cast is fused."""
    if backend == "triton":
        request.getfixturevalue("interpreted")
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(2, 50, 60, generator=gen) * torch.tensor([1.0, 1e-3]).view(2, 1, 1)).to(dtype)
    for q in (0.9, 0.5):
        check(x, q, backend, out_dtype=out_dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_gives_nan_threshold(backend, request):
    """A NaN anywhere in a matrix makes its threshold NaN (as torch.quantile), and so its whole clamped output;
    the other matrices of the batch are untouched."""
    if backend == "triton":
        request.getfixturevalue("interpreted")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 30, 40, generator=gen)
    x[1, 7, 9] = float("nan")
    for q in (0.0, 0.9):
        clamped, t = check(x, q, backend)
        assert t[1].isnan() and not t[[0, 2]].isnan().any()
        assert clamped[1].isnan().all() and not clamped[[0, 2]].isnan().any()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_float64(backend):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 40, 70, generator=gen, dtype=torch.float64)
    for q in QS:
        clamped, t = check(x, q, backend)
        assert t.dtype == clamped.dtype == torch.float64
    check(x, 0.9, backend, out_dtype=torch.float32)
    check(x.float(), 0.9, backend, out_dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend, request):
    if backend == "triton":
        request.getfixturevalue("interpreted")
    gen = torch.Generator().manual_seed(9)
    for x in (torch.randn(50, 40, generator=gen).t(), torch.randn(40, 3, 50, generator=gen).transpose(0, 1)):
        assert not x.is_contiguous()
        check(x, 0.9, backend)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cpu_radix_select_on_every_case(dtype, monkeypatch):
    """The cpu backend's two strategies agree with torch.quantile on the adversarial cases: small matrices go to
    torch.kthvalue (the tests above), larger ones to the radix select, forced here for the same small inputs."""
    monkeypatch.setattr(qc, "KTHVALUE_MAX_ELEMENTS", 0)
    for name in CASES:
        x = _case(name).to(dtype)
        for q in QS:
            check(x, q, "cpu")


def test_past_torch_quantile_limit():
    """Over 2^24 elements torch.quantile refuses; the cpu backend follows the same rank formula (against two
    kthvalue calls and torch.lerp here)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4099, 4097, generator=gen)
    n = x.numel()
    assert n > 1 << 24
    lo, hi, w = linear_rank(n, 0.9, torch.float32)
    a = x.abs().flatten()
    want = torch.lerp(a.kthvalue(lo + 1).values, a.kthvalue(hi + 1).values, torch.tensor(w)) + 1e-9
    clamped, t = clamp_to_quantile(x, 0.9, backend="cpu")
    assert_same(t, want)
    assert_same(clamped, torch.clamp(x, -want, want))


def test_linear_rank_is_torch_quantiles():
    """With sorted values 0, .., 0, 1, .., 1 (the last 0 at floor r) torch.quantile returns its weight w exactly."""
    for n, q, dtype in ((1001, 1e-3, torch.float32), (56211, 0.123456, torch.float32), (999983, 0.9, torch.float32),
                        (4097, 0.3, torch.float64), (10, 0.9, torch.float32)):
        lo, hi, w = linear_rank(n, q, dtype)
        assert hi == lo + (w > 0)  # w = 0 at (1001, 1e-3) where the rank is rounded to float32 (torch 2.11)
        x = torch.ones(n, dtype=dtype)
        x[: lo + 1] = 0
        assert torch.quantile(x, q).item() == w


@pytest.mark.parametrize("in_float64,weight", [(True, 0.09978306293487549), (False, 0.099609375)])
def test_linear_rank_follows_either_torch_convention(monkeypatch, in_float64, weight):
    """torch 2.14.1 computes quantile's rank of float32 input in float64, torch 2.11.0 rounds it to float32 (seen on
    a GPU machine's torch): linear_rank follows the installed one; float64 input ranks in float64 either way."""
    monkeypatch.setattr(qc, "quantile_rank_in_float64", lambda: in_float64)
    assert linear_rank(9100, 0.9, torch.float32) == (8189, 8190, weight)
    assert linear_rank(9100, 0.9, torch.float64) == (8189, 8190, 0.9 * 9099 - 8189)


# ----------------------------------------------------------------------------- kernel pieces under the interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
def test_lerp_is_torch_lerp_bit_for_bit():
    """The kernel's lerp (an fma evaluated in fp64, rounded to odd) equals torch.lerp (a true fma) on random and
    edge-case operands, including one where rounding the fp64 fma to nearest and then to fp32 is wrong."""
    gen = torch.Generator().manual_seed(8)
    n = 4000
    lo = torch.rand(n, generator=gen) * 10.0 ** torch.randint(-40, 38, (n,), generator=gen)
    hi = lo + torch.rand(n, generator=gen) * 10.0 ** torch.randint(-40, 38, (n,), generator=gen)
    w = torch.rand(n, generator=gen) ** 3
    w[:100] = torch.tensor([0.0, 2.0 ** -30, 0.5 - 2.0 ** -25, 0.5, 1 - 2.0 ** -24]).repeat(20)
    # lo = 1 + 2^-23, hi - lo = 1 - 2^-23, w = 2^-24 + 2^-47: the exact fma is 1 + 2^-23 + 2^-24 - 2^-70
    tricky = (1 + 2.0 ** -23, 2.0, 2.0 ** -24 + 2.0 ** -47)
    edge = torch.tensor([tricky, (0.0, 0.0, 0.3), (1.0, INF, 0.2), (1.0, INF, 0.7), (INF, INF, 0.0), (2.0, 2.0, 0.0),
                         (0.0, 1e-45, 0.5), (0.0, 3e38, 0.99)])
    lo, hi, w = torch.cat([lo, edge[:, 0]]), torch.cat([hi, edge[:, 1]]), torch.cat([w, edge[:, 2]])
    out = torch.empty_like(lo)
    _kernel_module(True).lerp_kernel[(1,)](lo, hi, w, out, lo.numel(), BLOCK=triton.next_power_of_2(lo.numel()))
    assert_same(out, torch.lerp(lo, hi, w))
    # torch rounds the fma once; rounding it to nearest in fp64 first, then to fp32, would not
    naive = torch.tensor(tricky[2] * (tricky[1] - tricky[0]) + tricky[0], dtype=torch.float64).float().item()
    assert torch.lerp(*map(torch.tensor, tricky)).item() == 1 + 2.0 ** -23 != naive


def test_digit_schedules():
    k = _kernel_module(True)
    assert k.digits(torch.float32) == [(21, 11), (10, 11), (0, 10)]
    assert k.digits(torch.bfloat16) == [(21, 11), (16, 5)]
    assert k.digits(torch.float16) == [(21, 11), (13, 8)]


# ----------------------------------------------------------------------------- backend choice and errors
def test_errors(monkeypatch):
    x = torch.randn(4, 5)
    for bad, error, match in [
        (dict(x=torch.ones(4, 5, dtype=torch.int32)), ValueError, "real floating-point"),
        (dict(x=torch.randn(4, 5, dtype=torch.complex64)), ValueError, "real floating-point"),
        (dict(x=torch.randn(4, 5).to_sparse()), ValueError, "dense"),
        (dict(x=torch.randn(20)), ValueError, r"\(m, n\) or \(B, m, n\)"),
        (dict(x=torch.randn(2, 3, 4, 5)), ValueError, r"\(m, n\) or \(B, m, n\)"),
        (dict(x=torch.randn(0, 5)), ValueError, "empty matrices"),
        (dict(x=torch.randn(0, 4, 5)), ValueError, "empty matrices"),
        (dict(q=1.5), ValueError, r"q must be a number in \[0, 1\]"),
        (dict(q=-0.1), ValueError, r"q must be a number in \[0, 1\]"),
        (dict(q=float("nan")), ValueError, r"q must be a number in \[0, 1\]"),
        (dict(offset=-1e-9), ValueError, "offset must be a number >= 0"),
        (dict(out_dtype=torch.int8), ValueError, "out_dtype"),
        (dict(backend="fast"), ValueError, "backend must be one of"),
        (dict(backend="cuda"), ValueError, "backend 'cuda' needs CUDA tensors, got cpu"),
        (dict(backend="cuda", x=torch.randn(4, 5, dtype=torch.float64)), ValueError, "backend 'cuda' needs CUDA"),
        (dict(backend="cpu", x=torch.randn(4, 5, device="meta")), ValueError, "needs CPU tensors"),
        (dict(backend="triton", x=torch.randn(4, 5, dtype=torch.float64)), ValueError, "float64 runs on the cpu"),
        (dict(backend="triton", out_dtype=torch.float64), ValueError, "float64 runs on the cpu"),
    ]:
        with pytest.raises(error, match=match):
            clamp_to_quantile(**{"x": x, **bad})
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1"):
        clamp_to_quantile(x, backend="triton")


def test_auto_backend(monkeypatch):
    """auto: CPU tensors → cpu; CUDA tensors → cuda where the extension runs (the Triton select measured slower than
    the torch backend's sort), else and for float64 → torch; other devices → torch, warning once."""
    x = _case("normal")
    assert OP._resolve("auto", x, x.dtype) == "cpu"
    assert_same(clamp_to_quantile(x)[1], clamp_to_quantile(x, backend="cpu")[1])
    cuda = lambda dtype: types.SimpleNamespace(device=torch.device("cuda"), dtype=dtype)  # noqa: E731
    monkeypatch.setattr(OP, "probe", lambda backend: Probe(True, "test"))
    assert OP._resolve("auto", cuda(torch.bfloat16), torch.bfloat16) == "cuda"
    assert OP._resolve("auto", cuda(torch.float64), torch.float64) == "torch"
    assert OP._resolve("auto", cuda(torch.float32), torch.float64) == "torch"
    monkeypatch.setattr(OP, "probe", lambda backend: Probe(False, "no triton (test)"))
    assert OP._resolve("auto", cuda(torch.float32), torch.float32) == "torch"
    with pytest.raises(RuntimeError, match="backend 'triton' is not available: no triton"):
        OP._resolve("triton", cuda(torch.float32), torch.float32)
    meta = torch.randn(3, 4, 5, device="meta")
    with pytest.warns(RuntimeWarning, match="no kernel for meta tensors"):
        clamped, t = clamp_to_quantile(meta)
    assert clamped.shape == meta.shape and t.shape == (3,) and t.device.type == "meta"


def test_cuda_backend_refusals(monkeypatch):
    """backend="cuda" takes CUDA tensors of the kernel's dtypes only, and says why the kernel cannot run."""
    def cuda(dtype):  # what _resolve reads of a CUDA tensor
        return types.SimpleNamespace(device=torch.device("cuda"), dtype=dtype)

    monkeypatch.setattr(OP, "probe", lambda backend: Probe(True, "test"))
    assert OP._resolve("cuda", cuda(torch.float16), torch.bfloat16) == "cuda"
    for dtype, out_dtype in ((torch.float64, torch.float64), (torch.float32, torch.float64),
                             (torch.float64, torch.float32)):
        with pytest.raises(ValueError, match=r"backend 'cuda' takes and returns float32, bfloat16 or float16 .*"
                                             r"float64 runs on the torch backend"):
            OP._resolve("cuda", cuda(dtype), out_dtype)
    for device in ("cpu", "meta"):
        with pytest.raises(ValueError, match=f"backend 'cuda' needs CUDA tensors, got {device}"):
            OP._resolve("cuda", torch.randn(4, 5, device=device), torch.float32)
    monkeypatch.setattr(OP, "probe", lambda backend: Probe(False, "no CUDA device (test)"))
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is not available: no CUDA device \(test\)"):
        OP._resolve("cuda", cuda(torch.float32), torch.float32)


# ----------------------------------------------------------------------------- the CUDA C++ kernel (a GPU)
@pytest.mark.cuda
def test_cuda_kernel_matches_torch_quantile():
    """csrc/cuda/quantile_select.cu against torch.quantile bit for bit (expected() runs on CPU copies): every case
    at every q, fractional ranks on both sides of w = 0.5, the low-precision dtype pairs, a NaN matrix in a batch,
    a batch of many small matrices of different kinds, and a batch of a few large ones (many blocks per matrix).
    Every mismatch is collected and reported at the end (GPU time is scarce: one run shows them all)."""
    if not qc.probe("cuda").available:
        pytest.skip(f"the cuda backend cannot run: {qc.probe('cuda').reason}")
    mismatches = []

    def check_cuda(x, q, offset=1e-9, out_dtype=None):
        clamped, t, norm = clamp_to_quantile(x.cuda(), q, offset, backend="cuda", out_dtype=out_dtype, with_norm=True)
        assert clamped.is_cuda and t.is_cuda and norm.is_cuda
        want = expected(x, q, offset)
        bound = want.view(-1, 1, 1) if x.ndim == 3 else want
        try:
            assert_same(t.cpu(), want)
            assert_same(clamped.cpu(), torch.clamp(x.to(want.dtype), -bound, bound).to(out_dtype or x.dtype))
            assert_norm(norm.cpu(), clamped.cpu())
        except AssertionError as e:
            mismatches.append(f"{tuple(x.shape)} {x.dtype} q={q} offset={offset} out={out_dtype}: {str(e)[:300]}")
        return clamped.cpu(), t.cpu()

    for name in CASES:
        x = _case(name)
        for q in QS:
            check_cuda(x, q)
        for out_dtype in (torch.bfloat16, torch.float16):
            check_cuda(x, 0.9, out_dtype=out_dtype)
    assert clamp_to_quantile(_case("infinities").cuda(), 1.0, backend="cuda")[1].isnan()
    for q, offset in ((0.1, 0.0), (0.37, 1e-9), (0.77777, 0.5), (0.999, 1e-9), (1e-5, 0.0)):
        check_cuda(_case("normal"), q, offset)

    gen = torch.Generator().manual_seed(10)
    for dtype, out_dtype in [(torch.bfloat16, None), (torch.float16, None), (torch.bfloat16, torch.float32),
                             (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                             (torch.float16, torch.bfloat16)]:
        x = (torch.randn(2, 50, 60, generator=gen) * torch.tensor([1.0, 1e-3]).view(2, 1, 1)).to(dtype)
        for q in (0.9, 0.5, 0.0, 1.0):
            check_cuda(x, q, out_dtype=out_dtype)
        for name in CASES:  # the low-precision digit schedules on the adversarial cases
            check_cuda(_case(name).to(dtype), 0.9, out_dtype=out_dtype)

    x = torch.randn(3, 30, 40, generator=gen)
    x[1, 7, 9] = float("nan")
    for q in (0.0, 0.9):
        clamped, t = check_cuda(x, q)
        assert t[1].isnan() and not t[[0, 2]].isnan().any()
        assert clamped[1].isnan().all() and not clamped[[0, 2]].isnan().any()

    # many small matrices of different kinds in one batch: 63 elements (scalar loads), 512 (vector loads), 1
    kinds = [torch.randn(7, 9, generator=gen), (torch.randn(7, 9, generator=gen) * 2).round(),
             torch.full((7, 9), -0.5), torch.zeros(7, 9),
             torch.tensor([0.0, -0.0, INF, -INF, 1.0]).repeat(13)[:63].view(7, 9)]
    small = torch.stack([kinds[i % len(kinds)] * (1 + i % 3) for i in range(500)])
    for x in (small, torch.randn(300, 16, 32, generator=gen), torch.randn(64, 1, 1, generator=gen)):
        for q in (0.0, 0.5, 0.9, 1.0):
            check_cuda(x, q)
            check_cuda(x.bfloat16(), q)
    # a few large matrices: many blocks per matrix (the last-block scan), bf16 output, and one with many ties
    big = torch.randn(3, 1000, 1500, generator=gen)
    big[2] = (big[2] * 4).round()
    for q in (0.9, 0.5):
        check_cuda(big, q)
        check_cuda(big, q, out_dtype=torch.bfloat16)
        check_cuda(big.half(), q)
    check_cuda(torch.randn(2, 1001, 1499, generator=gen), 0.9)  # odd element count: scalar loads, many blocks
    assert not mismatches, f"{len(mismatches)} mismatches:\n" + "\n".join(mismatches[:30])


# ----------------------------------------------------------------------------- compile tests (no GPU needed)
_SPECS = _kernel_module(False).compile_specs()
_OPTIONS = {"num_warps": _kernel_module(False).NUM_WARPS}


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("spec", _SPECS, ids=[s[0] for s in _SPECS])
def test_compiles_without_spills(spec, arch):
    """The shipped configurations compile to PTX and cubin for sm_80 and sm_90, and ptxas reports no register
    spills and at most 255 registers. If triton was first imported with TRITON_INTERPRET=1, its standard-library
    functions are interpreted ones the compiler cannot call: the checks then run in a subprocess."""
    name = spec[0]
    if isinstance(tl.standard._elementwise_max, triton.runtime.JITFunction):
        res = compile_check(_kernel_module(False), name, arch, **_OPTIONS)
    else:
        res = compile_checks_in_subprocess("select", **_OPTIONS)[f"{name}-{arch}"]
    assert re.search(rf"\.entry {spec[1].__name__}\b", res["ptx"]) and res["cubin"] > 0
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", res["ptxas"])]
    regs = re.search(r"Used (\d+) registers", res["ptxas"])
    assert spills and not any(spills), f"{name} sm_{arch}: register spills\n{res['ptxas']}"
    assert regs and int(regs.group(1)) <= 255, res["ptxas"]
