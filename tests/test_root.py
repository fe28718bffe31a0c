"""ROOT against the official algorithm's equations (sum momentum, quantile soft-threshold, NS, 0.2·√max scale)."""

import math

import pytest
import torch

import fastopt
from fastopt.ops import newton_schulz


def params(dtype=torch.float64, shapes=((24, 40), (40, 24), (16, 16))):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def grads(ps, steps):
    gen = torch.Generator().manual_seed(1)
    # a few large entries per matrix: the outliers the soft-threshold is for
    return [[torch.randn(p.shape, generator=gen, dtype=p.dtype) * (1 + 20 * (torch.rand(p.shape, generator=gen) > 0.97))
             for p in ps] for _ in range(steps)]


def root_by_hand(ps, gs, lr, wd, mu, nesterov, q, precision="fp64"):
    """The official code's step, written from its equations: ε from torch.quantile, o = sign·relu(|M| − ε)."""
    ps = [p.detach().clone().double() for p in ps]
    bufs = [torch.zeros_like(p) for p in ps]
    for g in gs:
        for i, gi in enumerate(g):
            gi = gi.double()
            bufs[i] = mu * bufs[i] + gi
            m = gi + mu * bufs[i] if nesterov else bufs[i]
            eps = torch.quantile(m.abs().flatten(), q) + 1e-9
            outliers = m.sign() * torch.relu(m.abs() - eps)
            u = newton_schulz(m - outliers, steps=5, coefficients="root", backend="torch", precision=precision)
            ps[i] = ps[i] * (1 - lr * wd) - 0.2 * math.sqrt(max(ps[i].shape)) * lr * u.double()
    return ps


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("q", [0.9, 0.5])
def test_matches_the_official_equations_in_fp64(nesterov, q):
    ps = params()
    gs = grads(ps, 3)
    expected = root_by_hand(ps, gs, 0.01, 0.1, 0.95, nesterov, q)
    opt = fastopt.ROOT(ps, lr=0.01, weight_decay=0.1, nesterov=nesterov, quantile=q, backend="torch")
    for g in gs:
        for p, gp in zip(ps, g):
            p.grad = gp.clone()
        opt.step()
    for p, e in zip(ps, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-13)
        assert set(opt.state[p]) == {"step", "momentum_buffer"}


@pytest.mark.parametrize("ns_dtype,tolerance", [("fp32", 1e-4), ("bf16", 3e-2)])
def test_cpu_backend_against_the_official_equations(ns_dtype, tolerance):
    """The official code runs NS in fp32 (tight); bf16 NS is within bf16's noise (loose)."""
    ps = params(torch.float32, shapes=((64, 160), (160, 64), (48, 48)))
    start = [p.detach().clone() for p in ps]
    gs = grads(ps, 3)
    expected = root_by_hand(ps, gs, 0.01, 0.1, 0.95, True, 0.9)
    opt = fastopt.ROOT(ps, lr=0.01, ns_dtype=ns_dtype, backend="cpu")
    for g in gs:
        for p, gp in zip(ps, g):
            p.grad = gp.clone()
        opt.step()
    for p, p0, e in zip(ps, start, expected):
        moved = (e - p0.double()).norm()
        assert ((p.detach().double() - e).norm() / moved).item() < tolerance


def test_non_matrices_and_use_root_false_take_adamw():
    matrix, vector, head = params(shapes=((8, 12), (12,), (12, 30)))
    opt = fastopt.ROOT([{"params": [matrix, vector]}, {"params": [head], "use_root": False}], backend="torch")
    for p in (matrix, vector, head):
        p.grad = torch.ones_like(p)
    opt.step()
    assert set(opt.state[matrix]) == {"step", "momentum_buffer"}
    assert set(opt.state[vector]) == set(opt.state[head]) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("kwargs,match", [(dict(quantile=1.5), "quantile"), (dict(ns_dtype="fp8"), "ns_dtype"),
                                          (dict(momentum=1.0), "momentum")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastopt.ROOT(params(), **kwargs)


@pytest.mark.parametrize("cls", [fastopt.ROOT, fastopt.Scion])
def test_checkpoint_round_trip_continues_identically(cls):
    ps, copy = params(torch.float32), params(torch.float32)
    gs = grads(ps, 3)
    opt = cls(ps, backend="cpu", state_dtype="bf16")
    for g in gs[:2]:
        for p, gp in zip(ps, g):
            p.grad = gp.clone()
        opt.step()
    for p, c in zip(ps, copy):
        c.data.copy_(p.detach())
    resumed = cls(copy, backend="cpu", state_dtype="bf16")
    resumed.load_state_dict(opt.state_dict())
    for o, group in ((opt, ps), (resumed, copy)):
        for p, gp in zip(group, gs[2]):
            p.grad = gp.clone()
        o.step()
    for p, c in zip(ps, copy):
        assert torch.equal(p, c)


def test_the_selection_takes_its_own_auto(monkeypatch):
    """backend="auto": the quantile selection picks its kernel itself (on CUDA the CUDA select or a sort, not the
    slower Triton select of a triton bucket); an explicit backend is passed on as it is."""
    from fastopt.optim import root

    seen = []

    def recording(x, *args, backend, **kwargs):
        seen.append(backend)
        return fastopt.ops.clamp_to_quantile(x, *args, backend=backend, **kwargs)

    monkeypatch.setattr(root, "clamp_to_quantile", recording)
    for requested in ("auto", "cpu", "torch"):
        ps = params(torch.float32, shapes=((8, 12),))
        ps[0].grad = torch.randn(8, 12)
        fastopt.ROOT(ps, backend=requested).step()
        assert seen.pop() == requested
