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
    for g in grads:
        soap_step(p, g, state, lr=3e-3, **kwargs)
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
    assert state["step"] == STEPS - 1


def test_first_step_only_builds_the_bases_and_they_are_orthonormal():
    p0, grads = tensors((6, 10), 2)
    p, state = p0.clone(), {}
    soap_step(p, grads[0], state, lr=1.0)
    assert torch.equal(p, p0) and state["step"] == 0
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
