"""Scion: each norm's LMO against its definition, the momentum convention, both variants."""

import math

import pytest
import torch

import fastopt
from fastopt.ops import newton_schulz


def param(*shape, seed=0):
    return torch.nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                                          dtype=torch.float64))


def one_step(p, g, **kwargs):
    """p after one step from p = 0, with momentum 1 (the buffer is g), lr 1, scale 1: -lmo(g)."""
    p.data.zero_()
    p.grad = g.clone()
    opt = fastopt.Scion([p], lr=1.0, momentum=1.0, unconstrained=True, backend="torch", **kwargs)
    opt.step()
    return -p.detach()


def rms(x, dim):
    return x.square().mean(dim=dim).sqrt()


def test_spectral_is_the_scaled_orthogonalisation():
    p, g = param(12, 30), param(12, 30, seed=1).detach()
    lmo = one_step(p, g)  # "auto" on a matrix
    expected = newton_schulz(g, steps=10, backend="torch", precision="fp64") * math.sqrt(12 / 30)
    torch.testing.assert_close(lmo, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(one_step(p, g, norm="spectral", norm_kwargs={"normalized": False}),
                               expected * math.sqrt(30), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(one_step(p, g, norm="spectral", norm_kwargs={"max": True}),
                               expected / math.sqrt(12 / 30), rtol=1e-12, atol=1e-13)
    # the direction is the polar factor U·Vᵀ of g, up to the quintic's spread of singular values
    s = torch.linalg.svdvals(lmo / math.sqrt(12 / 30))
    assert 0.65 <= s.min() and s.max() <= 1.25
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert (lmo * (u @ vh)).sum() / (lmo.norm() * (u @ vh).norm()) > 0.97


def test_spectral_conv_flattens_and_scales_by_the_kernel():
    p, g = param(8, 4, 3, 3), param(8, 4, 3, 3, seed=1).detach()
    expected = newton_schulz(g.reshape(8, 36), steps=10, backend="torch", precision="fp64").reshape(g.shape)
    torch.testing.assert_close(one_step(p, g), expected * math.sqrt(8 / 4) / 9, rtol=1e-12, atol=1e-14)


def test_elementwise_norms_against_their_definitions():
    p, g = param(6, 10), param(6, 10, seed=1).detach()
    torch.testing.assert_close(one_step(p, g, norm="sign"), g.sign() / 10)
    torch.testing.assert_close(one_step(p, g, norm="sign", norm_kwargs={"normalized": False}), g.sign())
    col = one_step(p, g, norm="colnorm")  # every column's RMS becomes 1
    torch.testing.assert_close(rms(col, 0), torch.ones(10, dtype=torch.float64))
    torch.testing.assert_close(col * rms(g, 0), g)
    torch.testing.assert_close(rms(one_step(p, g, norm="colnorm", norm_kwargs={"normalized": True}), 0),
                               torch.full((10,), 1 / 10, dtype=torch.float64))
    embedding = one_step(p, g, norm="colnorm", norm_kwargs={"transpose": True})  # per row: one token's vector
    torch.testing.assert_close(rms(embedding, 1), torch.ones(6, dtype=torch.float64))
    row = one_step(p, g, norm="rownorm")  # every row's norm becomes 1/√d_in
    torch.testing.assert_close(row.norm(dim=1), torch.full((6,), 1 / math.sqrt(10), dtype=torch.float64))
    torch.testing.assert_close(one_step(p, g, norm="rownorm", norm_kwargs={"normalized": False}).norm(dim=1),
                               torch.ones(6, dtype=torch.float64))
    v, gv = param(7), param(7, seed=1).detach()
    bias = one_step(v, gv)  # "auto" on a vector: bias_rms
    torch.testing.assert_close(rms(bias, 0), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(bias * rms(gv, 0), gv)


def test_momentum_convention_and_variants():
    """momentum is the new gradient's weight (official convention), beta the usual EMA factor."""
    gs = [param(5, 7, seed=s).detach() for s in (1, 2)]
    p0 = param(5, 7)
    results = {}
    for label, kwargs in {"momentum": dict(momentum=0.25), "beta": dict(beta=0.75)}.items():
        p = torch.nn.Parameter(p0.detach().clone())
        opt = fastopt.Scion([p], lr=0.1, scale=2.0, norm="sign", backend="torch", **kwargs)
        for g in gs:
            p.grad = g.clone()
            before = p.detach().clone()
            opt.step()
        buf = opt.state[p]["momentum_buffer"]
        torch.testing.assert_close(buf, 0.75 * (0.25 * gs[0]) + 0.25 * gs[1])
        # constrained (default): p ← (1 - lr)·p - lr·scale·sign(B)/d_in
        torch.testing.assert_close(p.detach(), 0.9 * before - 0.1 * 2.0 * buf.sign() / 7)
        results[label] = p.detach()
    torch.testing.assert_close(results["momentum"], results["beta"])
    p = torch.nn.Parameter(p0.detach().clone())
    p.grad = gs[0].clone()
    fastopt.Scion([{"params": [p], "beta": 0.9}], lr=0.1, norm="sign", unconstrained=True, backend="torch").step()
    torch.testing.assert_close(p.detach(), p0.detach() - 0.1 * gs[0].sign() / 7)


def test_cpu_backend_bf16_state_and_skipped_steps():
    ref, fast = param(64, 96), torch.nn.Parameter(param(64, 96).detach().float())
    opt_ref = fastopt.Scion([ref], lr=0.01, backend="torch", ns_precision="fp32")
    opt = fastopt.Scion([fast], lr=0.01, backend="cpu", state_dtype="bf16")
    for seed in range(3):
        g = param(64, 96, seed=10 + seed).detach().float()
        ref.grad, fast.grad = g.double(), g.clone()
        opt_ref.step()
        opt.step()
    assert opt.state[fast]["momentum_buffer"].dtype == torch.bfloat16
    assert ((fast.double() - ref).norm() / (ref - param(64, 96)).norm()).item() < 0.05
    fast.grad = torch.full_like(fast, float("inf"))
    opt.found_inf = torch.ones(())
    before, buf = fast.detach().clone(), opt.state[fast]["momentum_buffer"].clone()
    opt.step()
    assert torch.equal(fast.detach(), before) and torch.equal(opt.state[fast]["momentum_buffer"], buf)


@pytest.mark.parametrize("kwargs,match", [
    (dict(momentum=0.1, beta=0.9), "not both"),
    (dict(momentum=0.0), "did you mean beta=0"),
    (dict(momentum=1.5), "momentum"),
    (dict(beta=1.0), "beta"),
    (dict(norm="frobenius"), "norm must be one of"),
    (dict(norm="sign", norm_kwargs={"transpose": True}), "takes norm_kwargs"),
    (dict(ns_precision="fp8"), "ns_precision"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastopt.Scion([param(3, 3)], **kwargs)


def test_norm_that_does_not_fit_the_shape():
    v = param(5)
    v.grad = torch.ones_like(v)
    opt = fastopt.Scion([v], norm="spectral", backend="torch")
    with pytest.raises(ValueError, match="takes matrices"):
        opt.step()
    assert torch.equal(opt.state[v]["momentum_buffer"], torch.zeros_like(v))  # the refused step changed nothing
