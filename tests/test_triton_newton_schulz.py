"""Triton Newton-Schulz kernels (triton_kernels/newton_schulz.py): interpreter runs on CPU tensors against torch and
the fp64 reference, the engine's backend="triton", and real sm_80 / sm_90 compiles of the shipped configurations.

Each mode gets its own private copy of the kernel module, executed with ``TRITON_INTERPRET`` set only while it is
imported (see tests/test_triton_elementwise_step.py for why); the engine tests put the interpreted copy in
``sys.modules`` under the name the engine imports, and set ``TRITON_INTERPRET=1`` so that the engine accepts CPU
tensors. The interpreter's fp32 -> bf16 cast truncates (the GPU rounds to nearest even): bf16 tolerances allow it.
"""
import importlib
import re
import sys
import warnings

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from fastopt.backends import Probe  # noqa: E402
from fastopt.ops import newton_schulz  # noqa: E402
from fastopt.ops.newton_schulz import flops, triton_flops  # noqa: E402
from triton_testing import compile_check, compile_checks_in_subprocess, kernel_module  # noqa: E402

ENGINE = importlib.import_module("fastopt.ops.newton_schulz")  # the module (fastopt.ops.newton_schulz is the function)
KERNELS = "fastopt.triton_kernels.newton_schulz"
SMALL = (16, 16, 16, 1, 1, 255)  # block_m, block_n, block_k, warps, stages, registers: several tiles on small shapes


def _kernel_module(interpret: bool):
    """The private copy of newton_schulz.py; the interpreted one also has the test's upper_tile_kernel."""
    return kernel_module("newton_schulz", interpret, upper_tile_kernel=_upper_tile_kernel)


def _upper_tile_kernel(p_ptr, i_ptr, j_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    i, j = _kernel_module(True)._upper_tile(tl.load(p_ptr + offs, mask=mask, other=0))
    tl.store(i_ptr + offs, i, mask=mask)
    tl.store(j_ptr + offs, j, mask=mask)


def gaussian(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _config(k, dtype, small):
    return k.Config(*SMALL) if small else k.CONFIGS[dtype]


# The fp32 accumulation's error plus one rounding to the stored dtype (a truncation, under the interpreter): at most
# a spacing of that dtype at the largest entry.
SPACING = {torch.float32: 0.0, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def _tolerance(dtype, ref):
    return ref.abs().max().item() * (SPACING[dtype] + 1e-6)


# ----------------------------------------------------------------------------- kernels under the interpreter
def test_upper_tile_enumeration():
    """p = j(j+1)/2 + i, i ≤ j, column by column, for every p of a 181-tile grid and at the ends of columns up to
    j = 46000, where the fp32 square root can be off by one."""
    k = _kernel_module(True)
    exact = [(i, j) for j in range(181) for i in range(j + 1)]
    far = torch.tensor([1000, 4095, 4096, 23169, 30000, 46000])
    starts = far * (far + 1) // 2
    p = torch.cat([torch.arange(len(exact)), starts - 1, starts, starts + far]).to(torch.int32)
    want_i = torch.cat([torch.tensor([e[0] for e in exact]), far - 1, torch.zeros_like(far), far])
    want_j = torch.cat([torch.tensor([e[1] for e in exact]), far - 1, far, far])
    i, j = torch.empty_like(p), torch.empty_like(p)
    k.upper_tile_kernel[(1,)](p, i, j, p.numel(), BLOCK=triton.next_power_of_2(p.numel()))
    assert torch.equal(i.long(), want_i) and torch.equal(j.long(), want_j)


@pytest.mark.parametrize("small", [False, True], ids=["shipped", "tiles16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m,k_dim", [(1, 33), (17, 33), (70, 130)])
def test_symmetric_product(m, k_dim, dtype, small):
    """alpha·A·Aᵀ + beta·Bias on a batch of 3: every entry written, exactly symmetric, as torch's fp64 product."""
    k = _kernel_module(True)
    if small and m == 70:
        k_dim = 40  # 5 x 5 tiles of 16; a shorter K keeps the interpreter quick
    a = gaussian(3, m, k_dim, dtype=dtype)
    bias = gaussian(3, m, m, seed=1)
    bias = (bias + bias.mT).to(dtype)
    for alpha, beta, c in ((1.0, 0.0, None), (2.0315, -4.775, bias)):
        out = torch.full((3, m, m), float("nan"), dtype=dtype)
        k.symmetric_product(a, out, alpha, bias=c, beta=beta, config=_config(k, dtype, small))
        ref = alpha * a.double() @ a.double().mT + (0 if c is None else beta * c.double())
        assert torch.equal(out, out.mT) and not out.isnan().any()
        assert (out.double() - ref).abs().max().item() <= _tolerance(dtype, ref)


@pytest.mark.parametrize("small", [False, True], ids=["shipped", "tiles16"])
@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32), (torch.float32, torch.float16)],
                         ids=["fp32", "bf16", "bf16-out_fp32", "fp32-out_fp16"])
@pytest.mark.parametrize("m,n", [(1, 33), (17, 33), (70, 130)])
def test_product_add(m, n, dtype, out_dtype, small):
    """P·X + a·X on a batch of 3, every entry written, as torch's fp64 product (rounded once to out_dtype)."""
    k = _kernel_module(True)
    if small and m == 70:
        m, n = 40, 70
    p, x = gaussian(3, m, m, dtype=dtype), gaussian(3, m, n, seed=1, dtype=dtype)
    out = torch.full((3, m, n), float("nan"), dtype=out_dtype)
    k.product_add(p, x, 3.4445, out, config=_config(k, dtype, small))
    ref = p.double() @ x.double() + 3.4445 * x.double()
    assert not out.isnan().any()
    assert (out.double() - ref).abs().max().item() <= _tolerance(out_dtype, ref)


def test_launcher_checks():
    k = _kernel_module(True)
    x = gaussian(2, 4, 8)
    with pytest.raises(TypeError, match="bfloat16 or float32"):
        k.newton_schulz(x.half(), [(1.0, 0.0, 0.0)], torch.float32)
    with pytest.raises(ValueError, match=r"\(B, m, n\) batch"):
        k.newton_schulz(x[0], [(1.0, 0.0, 0.0)], torch.float32)
    with pytest.raises(TypeError, match="out_dtype"):
        k.newton_schulz(x, [(1.0, 0.0, 0.0)], torch.float64)
    with pytest.raises(ValueError, match="out has shape"):
        k.symmetric_product(x, torch.empty(2, 4, 8))
    with pytest.raises(TypeError, match="p has dtype"):
        k.product_add(torch.empty(2, 4, 4, dtype=torch.bfloat16), x, 1.0, torch.empty_like(x))
    with pytest.raises(ValueError, match="compiled kernels need CUDA tensors"):
        _kernel_module(False).newton_schulz(x, [(1.0, 0.0, 0.0)], torch.float32)
    assert k.newton_schulz(torch.empty(3, 0, 5), [(1.0, 0.0, 0.0)], torch.float16).shape == (3, 0, 5)


def test_launcher_pads_to_aligned_copies():
    """A transposed view and an address off by 4 bytes run as aligned copies, with the aligned input's result; sizes
    not multiples of 16 as zero-padded copies, with the iteration's result (zero rows and columns change nothing)."""
    k = _kernel_module(True)
    triples = [(3.4445, -4.775, 2.0315)] * 2
    x = gaussian(2, 16, 32) / 8
    aligned = k.newton_schulz(x, triples, torch.float32)
    assert aligned.is_contiguous()
    assert torch.equal(k.newton_schulz(x.mT.contiguous().mT, triples, torch.float32), aligned)
    assert torch.equal(k.newton_schulz(torch.cat([torch.zeros(1), x.flatten()])[1:].view(x.shape), triples,
                                       torch.float32), aligned)
    y = ref = x[:, :13, :27]
    for a, b, c in triples:
        gram = ref.double() @ ref.double().mT
        ref = a * ref.double() + (b * gram + c * gram @ gram) @ ref.double()
    out = k.newton_schulz(y, triples, torch.float32)
    assert out.shape == y.shape
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the engine, backend="triton"
@pytest.fixture
def interpreted(monkeypatch):
    """The engine's backend="triton" on CPU tensors: the interpreted kernel copy, TRITON_INTERPRET=1."""
    module = _kernel_module(True)
    monkeypatch.setitem(sys.modules, KERNELS, module)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return module


def _relative(y, exact):
    return ((y.double() - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("shape,coefficients", [((3, 17, 33), "muon"), ((130, 70), "polar_express"),
                                                ((3, 1, 33), "muon"), ((140, 150), "muon")],
                         ids=["3x17x33-muon", "130x70-polar_express", "3x1x33-muon", "140x150-muon"])
def test_engine_matches_the_fp64_reference(interpreted, shape, coefficients):
    """fp32: tight; bf16: at most twice the plain bf16 iteration's error (flash-attention's rule), even with the
    interpreter's truncating casts. 140 rows: 2 x 2 tiles of the shipped bf16 configuration."""
    x = gaussian(*shape)
    exact = newton_schulz(x.double(), coefficients=coefficients, backend="torch", precision="fp64")
    fp32 = newton_schulz(x, coefficients=coefficients, backend="triton", precision="fp32")
    bf16 = newton_schulz(x, coefficients=coefficients, backend="triton")
    assert fp32.shape == bf16.shape == x.shape and fp32.dtype == bf16.dtype == torch.float32
    assert _relative(fp32, exact) < 1e-4
    plain = newton_schulz(x, coefficients=coefficients, backend="torch", precision="bf16")
    assert _relative(bf16, exact) <= 2 * _relative(plain, exact) + 1e-3


def test_engine_batched_equals_one_by_one_and_out_dtype(interpreted):
    x = gaussian(3, 20, 36)
    batched = newton_schulz(x, backend="triton", steps=2)
    for i in range(3):
        assert torch.equal(batched[i], newton_schulz(x[i], backend="triton", steps=2))
    assert torch.equal(newton_schulz(x.mT, backend="triton", steps=2), batched.mT)
    # the last product writes fp16 directly; fp64 is no kernel output dtype: the fp32 result, converted
    half = newton_schulz(x, backend="triton", steps=2, out_dtype=torch.float16)
    double = newton_schulz(x, backend="triton", steps=2, precision="fp32", out_dtype=torch.float64)
    assert half.dtype == torch.float16 and double.dtype == torch.float64
    torch.testing.assert_close(half.float(), batched, rtol=2 ** -7, atol=2 ** -10)
    torch.testing.assert_close(double, newton_schulz(x, backend="triton", steps=2, precision="fp32").double(),
                               rtol=0, atol=0)


def test_engine_zero_and_huge_inputs(interpreted):
    assert torch.equal(newton_schulz(torch.zeros(2, 8, 12), backend="triton"), torch.zeros(2, 8, 12))
    x = gaussian(8, 12)
    huge = newton_schulz(x * 1e30, backend="triton", precision="fp32")  # the norm's squares overflow fp32
    torch.testing.assert_close(huge, newton_schulz(x, backend="triton", precision="fp32"), rtol=0, atol=1e-5)


def test_engine_backend_choice(monkeypatch):
    x = gaussian(4, 4)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        newton_schulz(x, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="precision='fp64'"):
        newton_schulz(x, backend="triton", precision="fp64")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        newton_schulz(x.to("meta"), backend="triton")
    cuda = torch.device("cuda")
    assert ENGINE._resolve("auto", torch.device("cpu"), "bf16") == "cpu"
    assert ENGINE._resolve("auto", cuda, "fp64") == "torch"
    monkeypatch.setattr(ENGINE, "probe", lambda backend: Probe(True, "test"))
    assert ENGINE._resolve("auto", cuda, "bf16") == "cuda"
    assert ENGINE._resolve("triton", cuda, "fp32") == "triton"
    monkeypatch.setattr(ENGINE, "probe", lambda backend: Probe(backend == "triton", "no nvcc (test)"))
    assert ENGINE._resolve("auto", cuda, "bf16") == "triton"
    monkeypatch.setattr(ENGINE, "probe", lambda backend: Probe(False, "no CUDA device (test)"))
    monkeypatch.setattr(ENGINE, "_WARNED", set())
    with pytest.warns(UserWarning, match=r"newton_schulz on cuda tensors \(cuda: no CUDA device \(test\); triton: "):
        assert ENGINE._resolve("auto", cuda, "bf16") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per device type
        assert ENGINE._resolve("auto", cuda, "bf16") == "torch"
    with pytest.raises(RuntimeError, match="'triton' is not available: no CUDA device"):
        ENGINE._resolve("triton", cuda, "bf16")


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(768, 3072), (4, 200, 1000), (1100, 520)], ids=["768x3072", "4x200x1000",
                                                                                    "1100x520"])
def test_engine_on_cuda(shape):
    """The compiled kernels: as on the interpreter."""
    x = gaussian(*shape).cuda()
    exact = newton_schulz(x.double(), backend="torch", precision="fp64")
    assert _relative(newton_schulz(x, backend="triton", precision="fp32"), exact) < 1e-4
    bf16 = newton_schulz(x, backend="triton")
    assert _relative(bf16, exact) <= 2 * _relative(newton_schulz(x, backend="torch", precision="bf16"), exact) + 1e-3


def test_triton_flops():
    """The symmetric products run T(T+1)/2 of T² tiles: at 768² (T = 6 tiles of 128 in bf16), 7/12 of their cost."""
    dense = 2 * 768 ** 3
    assert triton_flops(768, 768, 5) == 5 * (2 * dense * 7 / 12 + dense)
    assert triton_flops(768, 768, 5, "fp32") == 5 * (2 * dense * 13 / 24 + dense)  # 12 tiles of 64
    assert triton_flops(3072, 768, 5) == triton_flops(768, 3072, 5) < flops(768, 3072, 5)
    assert triton_flops(100, 300, 1) == flops(100, 300, 1)  # one tile: nothing saved


# ----------------------------------------------------------------------------- compile tests (no GPU needed)
_SPECS = _kernel_module(False).compile_specs()
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # opt-in shared memory per block, A100 and H100


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("spec", _SPECS, ids=[s[0] for s in _SPECS])
def test_compiles_without_spills(spec, arch):
    """The shipped configurations compile to PTX and cubin for sm_80 and sm_90 within the shared memory of an A100 /
    H100, bf16 on tensor cores (mma.sync / wgmma), and ptxas reports no register spills. If triton was first
    imported with TRITON_INTERPRET=1, its standard library cannot be compiled: the checks then run in a subprocess."""
    name = spec[0]
    if isinstance(tl.standard._elementwise_max, triton.runtime.JITFunction):
        res = compile_check(_kernel_module(False), name, arch)
    else:
        res = compile_checks_in_subprocess("newton_schulz")[f"{name}-{arch}"]
    assert f".entry {spec[1].__name__}" in res["ptx"] and res["cubin"] > 0
    assert 0 < res["shared"] <= SHARED_LIMIT[arch], res["shared"]
    tensor_cores = bool(re.search(r"\b(mma\.sync|wgmma)\.", res["ptx"]))
    assert tensor_cores == name.startswith(("symmetric_bf16", "product_bf16")), name
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", res["ptxas"])]
    regs = re.search(r"Used (\d+) registers", res["ptxas"])
    assert spills and not any(spills), f"{name} sm_{arch}: register spills\n{res['ptxas']}"
    assert regs and int(regs.group(1)) <= 255, res["ptxas"]
