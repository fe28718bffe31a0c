"""The Kronecker-factor update (fastopt.ops.kron_factor_update) against its equations in fp64, on every backend."""

import sys

import pytest
import torch

from fastopt.ops import kron_factor_update


def gaussian(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def factors(batch, m, n, seed=1):
    """Symmetric positive semi-definite starting factors, as a running EMA of G·Gᵀ would be."""
    a, b = gaussian(*batch, m, m, seed=seed), gaussian(*batch, n, n, seed=seed + 1)
    return (a @ a.mT + (a @ a.mT).mT) / (2 * m), (b @ b.mT + (b @ b.mT).mT) / (2 * n)  # exactly symmetric


def expected(left, right, g, beta):
    g = g.double()
    return (beta * left.double() + (1 - beta) * g @ g.mT, beta * right.double() + (1 - beta) * g.mT @ g)


def assert_factor(got, want, mirrored=False):
    """Close to the fp64 update; ``mirrored`` (the Triton kernel: one triangle of tiles, each diagonal tile's
    upper half mirrored): exactly symmetric."""
    assert not mirrored or torch.equal(got, got.mT)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


# (600, 520): the CPU backend's symmetric products in 2 row blocks, updated in place
@pytest.mark.parametrize("shape", [(5, 7), (3, 40, 24), (600, 520)])
@pytest.mark.parametrize("beta", [0.95, 0.0, 1.0])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_matches_the_equations(shape, beta, backend):
    g = gaussian(*shape)
    left, right = factors(shape[:-2], *shape[-2:])
    want = expected(left, right, g, beta)
    kron_factor_update(left, right, g, beta, backend=backend)
    assert_factor(left, want[0])
    assert_factor(right, want[1])


def test_one_factor_bf16_gradients_fp64_and_batched():
    g = gaussian(3, 6, 9)
    left, right = factors((3,), 6, 9)
    right_before, want = right.clone(), expected(left, right, g.bfloat16().float(), 0.9)[0]
    kron_factor_update(left, None, g.bfloat16(), 0.9, backend="cpu")  # a dimension left unpreconditioned
    assert torch.equal(right, right_before)
    assert_factor(left, want)
    batched = right_before.clone()
    kron_factor_update(None, batched, g, 0.9, backend="cpu")
    for i in range(3):  # batched == one by one
        single = right_before[i].clone()
        kron_factor_update(None, single, g[i], 0.9, backend="cpu")
        assert torch.equal(single, batched[i])
    left64, right64 = (f.double() for f in factors((), 6, 9))
    want = expected(left64, right64, g[0], 0.5)
    kron_factor_update(left64, right64, g[0].double(), 0.5)  # auto: float64 on the torch backend
    torch.testing.assert_close(left64, want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(right64, want[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(17, 33), (2, 70, 20)])
def test_triton_backend_under_the_interpreter(shape, monkeypatch):
    """The Newton-Schulz engine's symmetric-product kernel with the factor as its bias, in place."""
    pytest.importorskip("triton")
    from triton_testing import kernel_module

    monkeypatch.setitem(sys.modules, "fastopt.triton_kernels.newton_schulz", kernel_module("newton_schulz", True))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = gaussian(*shape)
    left, right = factors(shape[:-2], *shape[-2:])
    want = expected(left, right, g, 0.95)
    kron_factor_update(left, right, g, 0.95, backend="triton")
    assert_factor(left, want[0], mirrored=True)
    assert_factor(right, want[1], mirrored=True)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(5, 7), (3, 40, 24), (600, 520), (2, 33, 1000)])
@pytest.mark.parametrize("beta", [0.95, 0.0])
def test_cuda_backend(shape, beta):
    """cuBLAS SSYRK on one triangle with the EMA as its beta term, mirrored: exactly symmetric, fp64-close
    (torch's default: no TF32 in fp32 matmuls, which SSYRK follows)."""
    assert not torch.backends.cuda.matmul.allow_tf32
    g = gaussian(*shape).cuda()
    left, right = (f.cuda() for f in factors(shape[:-2], *shape[-2:]))
    want = expected(left, right, g, beta)
    kron_factor_update(left, right, g, beta, backend="cuda")
    assert_factor(left, want[0], mirrored=True)
    assert_factor(right, want[1], mirrored=True)
    one_left, one_right = (f.cuda() for f in factors(shape[:-2], *shape[-2:]))
    for i in range(g.shape[0] if g.ndim == 3 else 0):  # batched == one by one
        kron_factor_update(one_left[i], one_right[i], g[i], beta, backend="cuda")
        assert torch.equal(one_left[i], left[i]) and torch.equal(one_right[i], right[i])


@pytest.mark.parametrize("call,error,match", [
    (lambda g, lf, rf: kron_factor_update(None, None, g, 0.9), ValueError, "both factors are None"),
    (lambda g, lf, rf: kron_factor_update(rf, lf, g, 0.9), ValueError, "L has shape"),
    (lambda g, lf, rf: kron_factor_update(lf.half(), None, g, 0.9), ValueError, "float32"),
    (lambda g, lf, rf: kron_factor_update(lf, rf, g, 1.5), ValueError, "beta"),
    (lambda g, lf, rf: kron_factor_update(lf, rf, g.flatten(), 0.9), ValueError, "gradient"),
    (lambda g, lf, rf: kron_factor_update(lf, rf, g, 0.9, backend="cuda"), ValueError, "float32 factors on CUDA"),
    (lambda g, lf, rf: kron_factor_update(lf, rf, g, 0.9, backend="gpu"), ValueError, "backend must be"),
    (lambda g, lf, rf: kron_factor_update(lf.mT, None, g[:, :4], 0.9), ValueError, "contiguous"),
])
def test_bad_arguments(call, error, match, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    g = gaussian(4, 6)
    left, right = factors((), 4, 6)
    left = left + gaussian(4, 4, seed=9)  # not symmetric: its transpose is a non-contiguous view of another matrix
    with pytest.raises(error, match=match):
        call(g, left, right)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        kron_factor_update(*factors((), 4, 6), g, 0.9, backend="triton")
