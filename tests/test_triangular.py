"""Blocked products with upper-triangular matrices (fastopt.ops.triangular) against dense matmuls."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastopt import backends
from fastopt.ops.triangular import (GRAM_FORM_MIN_ROWS, gram, mm_gram_upper, mm_upper, mm_upper_t, triangular_blocks,
                                   upper_gram, upper_mm_upper)


def upper(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).triu()


@pytest.mark.parametrize("shape", [(300, 300), (2, 600, 600), (1100, 1100)])
def test_products_equal_the_dense_ones(shape):
    q, u = upper(*shape, seed=0), upper(*shape, seed=1)
    x = torch.randn(*shape[:-2], 70, shape[-1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(mm_upper(x, q), x @ q, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mm_upper_t(x, q), x @ q.mT, rtol=1e-12, atol=1e-12)
    want, overwritten = u @ q, u + upper(*shape, seed=3).mT.tril(-1)  # a strictly lower part, ignored
    product = upper_mm_upper(overwritten, q)  # written over its first operand where it runs in blocks
    torch.testing.assert_close(product, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(product, product.triu())
    assert product.data_ptr() == overwritten.data_ptr() or triangular_blocks(shape[-1]) == 1


def _fraction(k):  # of a dense product's FLOPs, for k equal blocks
    return (k + 1) / (2 * k)


def test_the_blocks_skip_the_zero_triangles():
    n, k = 2048, triangular_blocks(2048)
    assert (triangular_blocks(511), k) == (1, 8)
    x, q = torch.randn(64, n), torch.randn(n, n).triu()
    # u·q: row block i (256 rows) times the triangle q[256i:, 256i:], itself in blocks (all equal here)
    widths = [n - 256 * i for i in range(k)]
    upper_by_upper = sum(256 * w * w * _fraction(triangular_blocks(w)) for w in widths) / n ** 3
    assert upper_by_upper < 0.23  # (1/6 in the limit; one level of blocks alone gives 0.40)
    for fn, fraction in ((mm_upper, _fraction(k)), (mm_upper_t, _fraction(k)), (upper_mm_upper, upper_by_upper)):
        operand = q if fn is upper_mm_upper else x
        with FlopCounterMode(display=False) as counter:
            fn(operand, q)
        dense = 2 * operand.shape[0] * n * n
        assert counter.get_total_flops() == pytest.approx(fraction * dense, rel=1e-9)


@pytest.mark.parametrize("batch", [(), (2,)])
def test_products_keep_the_operands_layout(batch):
    q = upper(*batch, 600, 600, seed=4)
    x = torch.randn(*batch, 70, 600, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for operand in (x, x.mT.contiguous().mT):  # row-major, and a transposed view
        for fn, dense in ((mm_upper, operand @ q), (mm_upper_t, operand @ q.mT)):
            result = fn(operand, q)
            torch.testing.assert_close(result, dense, rtol=1e-12, atol=1e-12)
            assert result.stride() == operand.stride()


@pytest.mark.parametrize("shape", [(600, 90), (1, 600, 90), (3, 600, 90), (1, 100, 90)])
def test_gram_is_symmetric_and_exact(shape):
    assert backends.probe("cpu").available, backends.probe("cpu").reason  # gram mirrors with the C++ kernel
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = x.mT.contiguous().mT  # a strided operand, as the mode-d unfolding gives
    with FlopCounterMode(display=False) as counter:
        result = gram(x)
    torch.testing.assert_close(result, x @ x.mT, rtol=1e-12, atol=1e-12)
    if shape[-2] >= 512:  # its upper block triangle computed (k = 2 row blocks: 3/4 of the FLOPs) and mirrored
        assert torch.equal(result, result.mT)
        assert counter.get_total_flops() == 0.75 * 2 * x.numel() * shape[-2]


@pytest.mark.parametrize("batch", [(), (2,)])
@pytest.mark.parametrize("n", [300, 600])
def test_products_with_the_gram_of_a_triangle(batch, n):
    """qᵀq exactly symmetric and fp64-equal to the dense product; x·qᵀq in both forms (two blocked products below
    GRAM_FORM_MIN_ROWS·n rows of x, one product with qᵀq from there), in x's layout where it runs in blocks."""
    assert backends.probe("cpu").available, backends.probe("cpu").reason  # upper_gram mirrors with the C++ kernel
    q = upper(*batch, n, n, seed=6)
    p = upper_gram(q)
    torch.testing.assert_close(p, q.mT @ q, rtol=1e-12, atol=1e-12)
    assert torch.equal(p, p.mT)
    for rows in (70, GRAM_FORM_MIN_ROWS * n):
        x = torch.randn(*batch, rows, n, generator=torch.Generator().manual_seed(rows), dtype=torch.float64)
        for operand in (x, x.mT.contiguous().mT):
            result = mm_gram_upper(operand, q)
            torch.testing.assert_close(result, operand @ q.mT @ q, rtol=1e-10, atol=1e-10)  # another association
            assert result.stride() == operand.stride() or triangular_blocks(n) == 1


def test_the_gram_of_a_triangle_skips_its_zeros():
    """upper_gram computes k(k+1)(k+2)/6 block products of a k-block triangle: 0.26 of the dense FLOPs at k = 6;
    x·qᵀq from 3n rows costs that plus one dense product, below it the two blocked products."""
    assert backends.probe("cpu").available, backends.probe("cpu").reason
    n = 768
    k = triangular_blocks(n)
    q = torch.randn(n, n).triu()
    with FlopCounterMode(display=False) as counter:
        upper_gram(q)
    assert k == 6 and counter.get_total_flops() == pytest.approx(k * (k + 1) * (k + 2) / (6 * k ** 3) * 2 * n ** 3)
    for rows, flops in ((GRAM_FORM_MIN_ROWS * n - 1, 2 * _fraction(k) * 2 * n * n * (GRAM_FORM_MIN_ROWS * n - 1)),
                        (GRAM_FORM_MIN_ROWS * n, 2 * n * n * GRAM_FORM_MIN_ROWS * n + k * (k + 1) * (k + 2) / (
                            6 * k ** 3) * 2 * n ** 3)):
        with FlopCounterMode(display=False) as counter:
            mm_gram_upper(torch.randn(rows, n), q)
        assert counter.get_total_flops() == pytest.approx(flops)
