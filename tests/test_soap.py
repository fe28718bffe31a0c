"""The SOAP reference (fastopt.reference.soap) against pytorch-optimizer's port of the official code and the
paper's invariants."""

import pytest
import torch

from fastopt.reference.soap import project, soap_step

STEPS = 23  # two eigenbasis refreshes at the default frequency 10


def tensors(shape, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=gen, dtype=torch.float64)
    return p, [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(steps)]


def run_reference(p, grads, **kwargs):
    p, state = p.clone(), {}
    for step, g in enumerate(grads, 1):
        soap_step(p, g, state, step, lr=3e-3, **kwargs)
    return p, state


# Full-rank factors only (a rectangular matrix's larger factor, or a vector's outer products over fewer steps
# than its length, is rank-deficient: its null-space basis is arbitrary and two correct implementations
# differ): square matrices, a short vector with and without its own preconditioner, and a 3-D tensor whose
# first dimension is above max_precond_dim (unrotated).
@pytest.mark.parametrize("shape,kwargs", [
    ((12, 12), {}),
    ((12, 12), dict(correct_bias=False, weight_decay=0.0, betas=(0.9, 0.99), shampoo_beta=0.8)),
    ((12, 12), dict(precondition_frequency=3, normalize_grads=True)),
    ((30,), {}),
    ((8,), dict(precondition_1d=True)),
    ((9, 5, 5), dict(max_precond_dim=6)),
])
def test_matches_pytorch_optimizer_soap(shape, kwargs):
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    p0, grads = tensors(shape, STEPS)
    ours, state = run_reference(p0, grads, **kwargs)
    port_kwargs = {("max_precondition_dim" if k == "max_precond_dim" else
                    "normalize_gradient" if k == "normalize_grads" else k): v for k, v in kwargs.items()}
    theirs = torch.nn.Parameter(p0.clone())
    opt = pytorch_optimizer.SOAP([theirs], lr=3e-3, **port_kwargs)
    for g in grads:
        theirs.grad = g.clone()
        opt.step()
    # the port (like the official code) runs the refresh's QR in float32: agreement to ~1e-7 relative after it;
    # its normalize_gradient adds eps (1e-8) to the RMS where the official code adds 1e-30
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-7)


def test_first_step_only_builds_the_bases_and_they_are_orthonormal():
    p0, grads = tensors((6, 10), 2)
    p, state = p0.clone(), {}
    soap_step(p, grads[0], state, 1, lr=1.0)
    assert torch.equal(p, p0) and not state["exp_avg"].any()
    left, right = state["GG"]
    torch.testing.assert_close(left, 0.05 * grads[0] @ grads[0].T)
    torch.testing.assert_close(right, 0.05 * grads[0].T @ grads[0])
    for q, factor in zip(state["Q"], state["GG"]):
        torch.testing.assert_close(q.T @ q, torch.eye(q.shape[0], dtype=q.dtype), atol=1e-12, rtol=0)
        eigenvalues = (q * (factor @ q)).sum(0)  # diag(Qᵀ F Q): descending
        assert torch.all(eigenvalues[:-1] >= eigenvalues[1:] - 1e-12)
    # project_back undoes project (rectangular, both factors)
    x = torch.randn(6, 10, dtype=torch.float64)
    torch.testing.assert_close(project(project(x, state["Q"]), state["Q"], back=True), x)
    torch.testing.assert_close(project(x, state["Q"]), state["Q"][0].T @ x @ state["Q"][1])


def test_refresh_sorts_and_permutes_the_second_moment():
    """A refresh on a hand-made state: bases = identity, factors diagonal with increasing entries. The power
    iteration F·Q keeps the directions, the estimated eigenvalues ask for the reverse order, so the new bases
    are the reversed identity (up to signs) and v's rows and columns are reversed with them."""
    from fastopt.reference.soap import _refresh_bases

    left, right = torch.diag(torch.arange(1.0, 4.0, dtype=torch.float64)), torch.diag(
        torch.arange(1.0, 5.0, dtype=torch.float64))
    v = torch.arange(12.0, dtype=torch.float64).reshape(3, 4)
    state = {"GG": [left, right], "Q": [torch.eye(3, dtype=torch.float64), torch.eye(4, dtype=torch.float64)],
             "exp_avg_sq": v.clone()}
    _refresh_bases(state)
    assert torch.equal(state["exp_avg_sq"], v.flip(0).flip(1))
    for q, n in zip(state["Q"], (3, 4)):
        torch.testing.assert_close(q.abs(), torch.eye(n, dtype=torch.float64).flip(1))


def test_optimizer_runs_the_reference_and_its_factor_kernel():
    """fastopt.SOAP on the torch backend is the reference; on the cpu backend the matrix factors run on
    kron_factor_update (fp32, close to the fp64 reference); a dimension above max_precond_dim has no factor."""
    import fastopt

    shapes = [(12, 12), (30,), (9, 5, 5), (40, 6)]
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(12)]
    expected = []
    for p0, gs in zip(start, zip(*grads)):
        expected.append(run_reference(p0, list(gs), precondition_frequency=5, max_precond_dim=20)[0])
    for backend, dtype, tolerance in (("torch", torch.float64, 1e-12), ("cpu", torch.float32, 1e-4)):
        ps = [torch.nn.Parameter(p0.to(dtype, copy=True)) for p0 in start]
        opt = fastopt.SOAP(ps, precondition_frequency=5, max_precond_dim=20, backend=backend)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.to(dtype)
            opt.step()
        for p, p0, e in zip(ps, start, expected):
            assert ((p.detach().double() - e).norm() / (e - p0).norm()).item() < tolerance
        assert opt.state[ps[3]]["GG"][0] is None and opt.state[ps[3]]["GG"][1].shape == (6, 6)


def test_optimizer_checkpoint_round_trip_and_refusals():
    import fastopt

    gen = torch.Generator().manual_seed(1)
    ps = [torch.nn.Parameter(torch.randn(8, 8, generator=gen)) for _ in range(2)]
    copy = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    grads = [[torch.randn(8, 8, generator=gen) for _ in ps] for _ in range(8)]
    opt = fastopt.SOAP(ps, precondition_frequency=3, backend="cpu")
    for gs in grads[:5]:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
    for p, c in zip(ps, copy):
        c.data.copy_(p.detach())
    resumed = fastopt.SOAP(copy, precondition_frequency=3, backend="cpu")
    resumed.load_state_dict(opt.state_dict())
    for gs in grads[5:]:  # across a refresh
        for o, group in ((opt, ps), (resumed, copy)):
            for p, g in zip(group, gs):
                p.grad = g.clone()
            o.step()
    for p, c in zip(ps, copy):
        assert torch.equal(p, c)
    with pytest.raises(NotImplementedError, match="merge_dims"):
        fastopt.SOAP(ps, merge_dims=True)
    with pytest.raises(NotImplementedError, match="fp32"):
        fastopt.SOAP(ps, state_dtype="bf16")
    with pytest.raises(ValueError, match="precondition_frequency"):
        fastopt.SOAP(ps, precondition_frequency=0)


def test_state_bytes_count_the_factors_and_bases():
    import fastopt

    p = torch.nn.Parameter(torch.randn(24, 96))
    p.grad = torch.randn(24, 96)
    opt = fastopt.SOAP([p], backend="cpu")
    opt.step()
    moments, factors = 2 * 24 * 96 * 4, 2 * (24 * 24 + 96 * 96) * 4  # m, v; L, R and Q_L, Q_R, fp32
    assert opt.state_bytes() == moments + factors + 4  # + the step counter
