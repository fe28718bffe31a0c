"""The CPU symmetric products (fastopt.ops.symmetric): the upper block triangle computed, the lower mirrored by the
C++ kernel fastopt::mirror_upper_."""

import pytest
import torch

from fastopt import backends
from fastopt.ops.symmetric import symmetric_blocks, symmetric_mm


@pytest.fixture(autouse=True)
def _extension():
    assert backends.probe("cpu").available, backends.probe("cpu").reason


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("m", [1, 5, 32, 33, 100, 600, 1027])
def test_mirror_upper_copies_the_upper_triangle_down(dtype, m):
    """Every size around the 32×32 tiles, rows wider than the matrix (a strided view), each element size; the
    upper triangle and the diagonal stay as they were, bit for bit (NaN payloads included)."""
    gen = torch.Generator().manual_seed(m)
    storage = torch.randn(m, m + 7, generator=gen).to(dtype)
    x = storage[:, :m]
    x[0, -1] = float("nan")
    upper = x.triu().clone()
    torch.ops.fastopt.mirror_upper_(x)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    assert torch.equal(x.triu().view(bits), upper.view(bits))
    assert torch.equal(x.tril(-1).view(bits), upper.triu(1).mT.contiguous().view(bits))
    assert torch.equal(storage[:, m:], torch.randn(m, m + 7, generator=torch.Generator().manual_seed(m))
                       .to(dtype)[:, m:])  # the padding columns untouched


def test_mirror_upper_refuses_what_it_cannot_mirror():
    with pytest.raises(RuntimeError, match="square matrix"):
        torch.ops.fastopt.mirror_upper_(torch.zeros(3, 4))
    with pytest.raises(RuntimeError, match="rows must be contiguous"):
        torch.ops.fastopt.mirror_upper_(torch.zeros(4, 4).mT)
    with pytest.raises(RuntimeError, match="real floating point"):
        torch.ops.fastopt.mirror_upper_(torch.zeros(4, 4, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [300, 600, 1100])
def test_symmetric_mm_equals_the_dense_product(dtype, m):
    """a·aᵀ and beta·bias + alpha·a·aᵀ (in place on the bias, as the Kronecker factor update runs it), blocked from
    m = 512: exactly symmetric, and equal to one dense product up to the accumulation order."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, 200, generator=gen).to(dtype)
    bias = torch.randn(m, m, generator=gen).to(dtype)
    bias = (bias + bias.mT) / 2
    tolerance = dict(rtol=2e-2, atol=0.5) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-3)
    product = symmetric_mm(a, a.mT, alpha=0.5)
    torch.testing.assert_close(product, 0.5 * (a.double() @ a.double().mT).to(dtype), **tolerance)
    expected = (0.9 * bias.double() + 0.1 * (a.double() @ a.double().mT)).to(dtype)
    updated = symmetric_mm(a, a.mT, bias=bias, beta=0.9, alpha=0.1, out=bias)
    assert updated.data_ptr() == bias.data_ptr()
    torch.testing.assert_close(updated, expected, **tolerance)
    if symmetric_blocks(m, dtype) > 1:
        assert torch.equal(product, product.mT) and torch.equal(updated, updated.mT)
