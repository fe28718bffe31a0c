"""PSGD Kron: the reference (fastopt.reference.kron) against hand-written fp64 steps, pytorch-optimizer's port and
kron_torch itself with identical random draws; fastopt.optim.kron.Kron's backends, checkpoints, memory and errors."""

import io

import pytest
import torch

import fastopt.reference.kron as ref
from fastopt import backends
from fastopt.optim.kron import Kron, kron_state_bytes
from fastopt.reference.kron import (kron_step, norm_lower_bound, precond_update_prob_schedule, rms_clip_scale,
                                    solve_triangular_right, update_factors)

F64 = torch.float64


def problem(shapes, steps, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    start = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    return start, [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for _ in range(steps)]


def run_reference(start, grads, prob, seed=5, **kwargs):
    """kron_step on copies of ``start`` with kron_torch's update counter, never balancing."""
    ps, states, generator, counter = [p.clone() for p in start], [{} for _ in start], torch.Generator(), 0
    generator.manual_seed(seed)
    for n, gs in enumerate(grads):
        counter += 1
        due = counter >= 1 / (prob(n) if callable(prob) else prob)
        counter = 0 if due else counter
        for p, g, state in zip(ps, gs, states):
            kron_step(p, g, state, n + 1, do_update=bool(due), generator=generator, **kwargs)
    return ps, states


def relative_error(x, expected, start):
    return ((x.double() - expected.double()).norm() / (expected.double() - start.double()).norm()).item()


# ---- the reference against its equations ---------------------------------------------------------


def spectral_lower_bound(s):
    """kron_torch's _lb written out: one power step from the column of s with the largest norm."""
    column = s[:, int(torch.argmax((s * s).sum(0)))]
    x = s.T @ column
    return torch.linalg.vector_norm(s @ (x / torch.linalg.vector_norm(x)))


@pytest.mark.parametrize("identity", [True, False])
def test_whitening_step_of_a_matrix_by_hand(identity):
    gen = torch.Generator().manual_seed(0)
    h, v = torch.randn(5, 3, generator=gen, dtype=F64), torch.randn(5, 3, generator=gen, dtype=F64)
    q1, q2 = torch.eye(5, dtype=F64), torch.eye(3, dtype=F64)
    if not identity:  # well-conditioned upper-triangular factors
        q1, q2 = q1 + 0.3 * torch.randn(5, 5, generator=gen, dtype=F64).triu(), q2 + 0.3 * torch.randn(
            3, 3, generator=gen, dtype=F64).triu()
    a = q1 @ h @ q2.T  # H ×_1 Q1 ×_2 Q2
    b = torch.linalg.inv(q1).T @ v @ torch.linalg.inv(q2)  # V ×_1 Q1⁻ᵀ ×_2 Q2⁻ᵀ
    expected = [q - 0.1 * (t1 - t2).triu() @ q / spectral_lower_bound(t1 + t2)
                for q, t1, t2 in ((q1, a @ a.T, b @ b.T), (q2, a.T @ a, b.T @ b))]
    factors = [q1.clone(), q2.clone()]
    update_factors(factors, h, v, 0.1)
    for q, e in zip(factors, expected):
        torch.testing.assert_close(q, e, rtol=1e-12, atol=1e-14)


def test_whitening_step_of_a_vector_by_hand():
    gen = torch.Generator().manual_seed(1)
    h, v, q = (torch.randn(7, generator=gen, dtype=F64) for _ in range(3))
    a, b = q * h, v / q
    expected = q - 0.1 * (a * a - b * b) * q / (a * a + b * b).max()
    factors = [q.clone()]
    update_factors(factors, h, v, 0.1)
    torch.testing.assert_close(factors[0], expected, rtol=1e-12, atol=1e-14)


def test_first_step_by_hand():
    """Step 1 from Q = I: M = G, H = G + √ε·mean|G|·V, then p ← p − η·clip(Q1ᵀQ1·H·Q2ᵀQ2) − η·λ·p."""
    p0, (grads,) = problem([(4, 6)], 1, dtype=F64)
    noise = torch.randn(4, 6, generator=torch.Generator().manual_seed(3)).double()  # drawn in fp32
    p, state = p0[0].clone(), {}
    kron_step(p, grads[0], state, 1, lr=0.5, weight_decay=0.1, generator=torch.Generator().manual_seed(3))
    h = grads[0] + torch.finfo(torch.float32).eps ** 0.5 * grads[0].abs().mean() * noise
    factors = [torch.eye(4, dtype=F64), torch.eye(6, dtype=F64)]
    update_factors(factors, h, noise, 0.1)
    u = factors[0].T @ factors[0] @ h @ factors[1].T @ factors[1]
    u = u * min(1.0, 1.1 / (u.square().mean().sqrt().item() + 1e-12))
    torch.testing.assert_close(p, p0[0] - 0.5 * (u + 0.1 * p0[0]), rtol=1e-12, atol=1e-12)
    for q, e in zip(state["Q"], factors):
        torch.testing.assert_close(q, e, rtol=1e-12, atol=1e-14)


def test_helpers():
    gen = torch.Generator().manual_seed(2)
    q = torch.eye(6, dtype=F64) + 0.5 * torch.randn(6, 6, generator=gen, dtype=F64).triu()
    x = torch.randn(2, 3, 6, generator=gen, dtype=F64)
    expected = x @ torch.linalg.inv(q)
    torch.testing.assert_close(solve_triangular_right(x, q), expected)
    torch.testing.assert_close(x, expected)  # solved in place
    for s in (torch.diag(torch.tensor([1.0, 5.0, 2.0], dtype=F64)), torch.outer(x[0, 0], x[0, 0])):
        torch.testing.assert_close(norm_lower_bound(s), torch.linalg.matrix_norm(s, 2))  # exact: diagonal, rank 1
    s = x[0].T @ x[0] + torch.eye(6, dtype=F64)
    bound, norm = norm_lower_bound(s), torch.linalg.matrix_norm(s, 2)
    assert norm / 6 ** 0.5 <= bound <= norm * (1 + 1e-12)
    assert norm_lower_bound(torch.zeros(3, 3)) == 0
    big, small = 3 * torch.ones(10), 0.5 * torch.ones(10)
    torch.testing.assert_close(big * rms_clip_scale(big), 1.1 * torch.ones(10))
    assert rms_clip_scale(small) == 1.0
    torch.testing.assert_close(rms_clip_scale(torch.stack([big, small]), batched=True), torch.tensor([1.1 / 3, 1.0]))


def test_probability_schedule():
    schedule = precond_update_prob_schedule()
    assert all(float(schedule(n)) == 1.0 for n in (0, 250, 500))
    assert 0.3 < float(schedule(1500)) < 0.4  # e^-1
    assert float(schedule(4000)) == pytest.approx(0.03, abs=1e-3) and float(schedule(10 ** 5)) == pytest.approx(0.03)


def test_update_counter_and_resume():
    """With probability 1/4 the factors change every 4th step; 10 steps straight equal 5 steps, a checkpoint
    (through torch.save/torch.load) into a new optimizer, and 5 more, bit for bit (generator state included)."""
    start, grads = problem([(6, 5), (7,), (2, 3, 4)], 10, seed=3)
    ps = [torch.nn.Parameter(p.clone()) for p in start]
    opt = Kron(ps, lr=1e-2, preconditioner_update_probability=0.25, weight_decay=0.1, backend="torch")
    changed = []
    for gs in grads:
        before = opt.state[ps[0]]["Q"][0].clone() if opt.state[ps[0]] else torch.eye(6)
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
        changed.append(not torch.equal(before, opt.state[ps[0]]["Q"][0]))
    assert changed == [n % 4 == 3 for n in range(10)]

    for prob in (0.5, None):
        straight = [torch.nn.Parameter(p.clone()) for p in start]
        first = Kron(straight, preconditioner_update_probability=prob, backend="torch", seed=7)
        resumed_params = [torch.nn.Parameter(p.clone()) for p in start]
        for n, gs in enumerate(grads):
            if n == 5:
                buffer = io.BytesIO()
                torch.save(first.state_dict(), buffer)
                buffer.seek(0)
                for r, s in zip(resumed_params, straight):
                    r.data.copy_(s.detach())
                resumed = Kron(resumed_params, preconditioner_update_probability=prob, backend="torch", seed=7)
                resumed.load_state_dict(torch.load(buffer, weights_only=True))
            for opt_, group in ((first, straight),) + (((resumed, resumed_params),) if n >= 5 else ()):
                for p, g in zip(group, gs):
                    p.grad = g.clone()
                opt_.step()
        for a, b in zip(straight, resumed_params):
            assert torch.equal(a, b)
        assert resumed.param_groups[0]["prob_step"] == 10


def test_checkpoint_with_a_torch_generator_noise_state():
    """A checkpoint of fastopt before the Philox stream holds a torch.Generator state for the CPU: it loads, and the
    first step says that the noise starts anew from the seed (the draws of a fresh optimizer), then goes on."""
    start, grads = problem([(6, 5)], 2, seed=8)
    runs = []
    for old in (True, False):
        p = torch.nn.Parameter(start[0].clone())
        opt = Kron([p], preconditioner_update_probability=1.0, seed=4)
        saved = opt.state_dict()
        if old:
            saved["param_groups"][0]["rng_states"] = {"cpu": torch.Generator().get_state()}
        opt.load_state_dict(saved)
        p.grad = grads[0][0].clone()
        if old:
            with pytest.warns(UserWarning, match="starts anew from the seed"):
                opt.step()
        else:
            opt.step()
        runs.append(p.detach().clone())
        assert opt.state_dict()["param_groups"][0]["rng_states"]["cpu"].dtype == torch.int64
    assert torch.equal(runs[0], runs[1])


def test_reproducible_and_invariants():
    """Same seed: bitwise equal; another seed: different noise. Q stays upper triangular and P = QᵀQ positive
    definite; zero gradients and one-hot rows keep everything finite."""
    start, grads = problem([(9, 7), (3, 4, 2)], 12)
    grads[3] = [torch.zeros_like(g) for g in grads[3]]
    grads[4][0] = torch.zeros(9, 7)
    grads[4][0][2, 5] = 1.0
    finals = []
    for seed in (0, 0, 1):
        ps = [torch.nn.Parameter(p.clone()) for p in start]
        opt = Kron(ps, lr=1e-2, preconditioner_update_probability=1.0, seed=seed, backend="torch")
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        finals.append([p.detach().clone() for p in ps])
        for p in ps:
            for q in opt.state[p]["Q"]:
                assert torch.isfinite(q).all() and torch.equal(q, q.triu())
                assert torch.linalg.eigvalsh(q.T.double() @ q.double()).min() > 0
    assert all(torch.equal(a, b) for a, b in zip(finals[0], finals[1]))
    assert not torch.equal(finals[0][0], finals[2][0])

    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = Kron([p], backend="torch")
    for _ in range(5):
        p.grad = torch.zeros(4, 3)
        opt.step()
    assert torch.isfinite(p).all() and all(torch.isfinite(q).all() for q in opt.state[p]["Q"])


# ---- cross-checks with identical draws ---------------------------------------------------------------


def test_matches_pytorch_optimizer_kron(monkeypatch):
    """pytorch-optimizer's port of kron_torch lacks kron_torch 0.3.3's noise damping (H = G): with the damping off
    and the same Gaussian draws (its global RNG, our generator), the trajectories agree to fp32 rounding."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    monkeypatch.setattr(ref, "_SQRT_EPS", 0.0)
    shapes = [(8, 6), (5,), (3, 4, 5), (40, 2), ()]
    start, grads = problem(shapes, 12, seed=1)
    for prob, wd in ((0.5, 0.1), (1.0, 0.0)):
        theirs = [torch.nn.Parameter(p.clone()) for p in start]
        opt = pytorch_optimizer.Kron(theirs, lr=1e-2, weight_decay=wd, pre_conditioner_update_probability=prob,
                                     balance_prob=0.0)
        torch.manual_seed(5)
        for gs in grads:
            for p, g in zip(theirs, gs):
                p.grad = g.clone()
            opt.step()
        ours, _ = run_reference(start, grads, prob, lr=1e-2, weight_decay=wd, merge_dims=False)
        for a, b, p0 in zip(ours, theirs, start):
            assert a.numel() == 1 or relative_error(a, b.detach(), p0) < 2e-6  # its RMS clip adds 1e-6, not 1e-12


def test_matches_kron_torch():
    """kron_torch 0.3.3 itself (when installed), balance off, same draws: merged dims, diagonal modes, schedule."""
    kron_torch = pytest.importorskip("kron_torch.kron")

    class NeverBalance:
        def random(self):
            return 1.0

    shapes = [(8, 6), (5,), (3, 4, 5), (40, 2), (2, 3, 4, 5)]
    start, grads = problem(shapes, 12, seed=1)
    cases = [(0.5, {}), (kron_torch.precond_update_prob_schedule(flat_start=3, decay=0.3),
                         dict(memory_save_mode="smart_one_diag", weight_decay=0.1, precond_init_scale=2.0)),
             (1.0, dict(momentum_into_precond_update=False, min_ndim_triangular=1, memory_save_mode="one_diag"))]
    with torch._dynamo.config.patch(disable=True):
        for prob, kwargs in cases:
            theirs = [torch.nn.Parameter(p.clone()) for p in start]
            opt = kron_torch.Kron(theirs, lr=1e-2, preconditioner_update_probability=prob, **kwargs)
            opt.rng = NeverBalance()
            torch.manual_seed(5)
            for gs in grads:
                for p, g in zip(theirs, gs):
                    p.grad = g.clone()
                opt.step()
            ours, _ = run_reference(start, grads, prob, lr=1e-2, **kwargs)
            for a, b, p0 in zip(ours, theirs, start):
                assert relative_error(a, b.detach(), p0) < 1e-6


# ---- the optimizer ---------------------------------------------------------------------------------


def available_backends():
    return [b for b in ("torch", "cpu", "triton") if backends.probe(b).available]


def assert_backends_match_the_fp64_reference(backend_names, device):
    """Each backend in fp32 against the fp64 reference on ``device`` (the noise comes from that device's stream:
    on the CPU the cpu backend's kernel draws what the reference's torch code draws, to a few ulps), by DESIGN.md's
    rule (≤ 2× the torch path's error + atol); odd shapes, a 0-d and a 1-element param, a step without a grad and a
    frozen param."""
    shapes = [(12, 9), (4097,), (), (1,), (3, 5, 7), (10, 1), (70, 40)]
    start, grads = problem(shapes, 8, seed=4, dtype=F64)
    for gs in grads[2:3]:
        gs[1] = None
    kwargs = dict(lr=1e-2, preconditioner_update_probability=0.5, weight_decay=0.05, seed=3)

    def run(backend, dtype):
        ps = [torch.nn.Parameter(p.to(device, dtype, copy=True)) for p in start]
        frozen = torch.nn.Parameter(torch.ones(3, device=device), requires_grad=False)
        opt = Kron(ps + [frozen], backend=backend, **kwargs)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = None if g is None else g.to(device, dtype)
            opt.step()
        assert torch.equal(frozen.cpu(), torch.ones(3)) and not opt.state[frozen]
        return [p.detach().cpu() for p in ps]

    expected = run("torch", F64)
    errors = {b: [relative_error(p, e, p0) for p, e, p0 in zip(run(b, torch.float32), expected, start)]
              for b in ["torch", *(b for b in backend_names if b != "torch")]}
    for backend, errs in errors.items():
        for err, base in zip(errs, errors["torch"]):
            assert err <= 2 * base + 1e-6, (backend, errs, errors["torch"])
    assert max(errors["torch"]) < 1e-4


def test_backends_against_the_fp64_reference():
    assert_backends_match_the_fp64_reference(available_backends(), "cpu")


def test_triton_backend_against_the_fp64_reference():
    """The triton backend (its momentum pass on the Triton kernel of the orthogonalized optimizers) on CPU tensors;
    under TRITON_INTERPRET=1 only: test_backends.py runs it in a subprocess that sets it."""
    if not backends.triton_interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 for the whole process")
    assert_backends_match_the_fp64_reference(["triton"], "cpu")


@pytest.mark.cuda
def test_gpu_backends_against_the_fp64_reference():
    assert_backends_match_the_fp64_reference(["triton", "cuda"], "cuda")


def test_same_shape_parameters_stacked_equal_one_at_a_time():
    """Same-layout parameters are preconditioned as one stack; one parameter per group never stacks. In float64 the
    two agree to rounding, the noise draws included (balancing on every update step)."""
    shapes = [(6, 5), (4,), (6, 5), (2, 3, 4), (6, 5), (4,), (2, 3, 4), (5, 6)]
    start, grads = problem(shapes, 6, seed=2, dtype=F64)

    def run(grouped):
        ps = [torch.nn.Parameter(p.clone()) for p in start]
        opt = Kron([{"params": [p]} for p in ps] if grouped else ps, lr=1e-2, preconditioner_update_probability=0.5,
                   weight_decay=0.1, seed=9)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        return ps, opt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("fastopt.optim.kron.BALANCE_PROB", 1.0)
        (stacked, opt), (alone, _) = run(False), run(True)
    for a, b, p0 in zip(stacked, alone, start):
        assert relative_error(a, b, p0) < 1e-12
    assert torch.equal(opt.state[stacked[0]]["Q"][0], torch.triu(opt.state[stacked[0]]["Q"][0]))


def test_state_dtypes_and_checkpoint_keys():
    start, grads = problem([(64, 80)], 3)
    results = {}
    for kwargs in (dict(state_dtype="fp32"), dict(state_dtype="bf16"), dict(mu_dtype=torch.bfloat16)):
        p = torch.nn.Parameter(start[0].clone())
        opt = Kron([p], backend="torch", **kwargs)
        for (g,) in grads:
            p.grad = g.clone()
            opt.step()
        results[str(kwargs)] = p.detach()
        state = opt.state_dict()["state"][0]
        assert set(state) == {"step", "momentum_buffer", "Q"} and [tuple(q.shape) for q in state["Q"]] == [
            (64, 64), (80, 80)]
        assert state["momentum_buffer"].dtype == (torch.float32 if kwargs == dict(state_dtype="fp32")
                                                  else torch.bfloat16)
    bf16, alias, fp32 = results["{'state_dtype': 'bf16'}"], results["{'mu_dtype': torch.bfloat16}"], results[
        "{'state_dtype': 'fp32'}"]
    assert torch.equal(bf16, alias) and relative_error(bf16, fp32, start[0]) < 1e-2


@pytest.mark.skipif(not backends.probe("cpu").available, reason="needs the C++ extension")
@pytest.mark.parametrize("state_dtype", ["fp32", "bf16", "fp8"])
def test_cpu_momentum_kernel_matches_the_torch_backend(state_dtype):
    """The cpu backend updates the momentum in the C++ kernel (any storage dtype), the torch backend in torch ops
    around a decode/encode: the stored momentum and the parameters agree to the storage's rounding."""
    start, grads = problem([(64, 80), (5000,)], 4, seed=6)
    runs = {}
    for backend in ("torch", "cpu"):
        ps = [torch.nn.Parameter(p.clone()) for p in start]
        opt = Kron(ps, backend=backend, state_dtype=state_dtype, lr=1e-2, seed=1)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        runs[backend] = ps, [opt._moment_value(opt.state[p], "momentum_buffer", p) for p in ps]
    (ps_t, ms_t), (ps_c, ms_c) = runs["torch"], runs["cpu"]
    rtol = dict(fp32=1e-5, bf16=1e-2, fp8=7e-2)[state_dtype]
    for m_t, m_c in zip(ms_t, ms_c):
        assert torch.linalg.vector_norm(m_t - m_c) <= rtol * torch.linalg.vector_norm(m_t)
    for p_t, p_c, p0 in zip(ps_t, ps_c, start):
        assert relative_error(p_c, p_t, p0) < rtol


def test_state_bytes_known_before_allocating():
    """A (50304, 768) embedding: a 50304-vector and a 768×768 triangle, ~2.6 MB of factors next to its momentum,
    never the 10 GB of a 50304² triangle; the meta-device allocation matches kron_state_bytes."""
    shape = (50304, 768)
    factors = (50304 + 768 * 768) * 4
    assert kron_state_bytes(shape) == 50304 * 768 * 4 + factors + 4
    assert factors < 3e6 < 10e9 < 50304 ** 2 * 4
    assert kron_state_bytes(shape, memory_save_mode="all_diag", state_dtype="bf16") == 50304 * 768 * 2 + (
        50304 + 768) * 4 + 4
    for shape, kwargs in (((50304, 768), {}), ((9000, 16), dict(state_dtype="fp8")), ((64, 3, 3, 3), {})):
        p = torch.nn.Parameter(torch.empty(shape, device="meta"))
        opt = Kron([p], backend="torch", **kwargs)
        opt._init_state(p, opt.param_groups[0])
        assert opt.state_bytes() == kron_state_bytes(shape, **kwargs)


def test_bad_input_and_gradients():
    p = torch.nn.Parameter(torch.randn(3, 3))
    for kwargs, error, name in ((dict(memory_save_mode="bogus"), ValueError, "memory_save_mode"),
                                (dict(lr=-1.0), ValueError, "lr"), (dict(b1=1.0), ValueError, "b1"),
                                (dict(preconditioner_update_probability=2.0), ValueError,
                                 "preconditioner_update_probability"),
                                (dict(max_size_triangular=0), ValueError, "max_size_triangular"),
                                (dict(precond_dtype=torch.bfloat16), NotImplementedError, "precond_dtype"),
                                (dict(mu_dtype=torch.bfloat16, state_dtype="fp8"), ValueError, "mu_dtype"),
                                (dict(seed=1.5), ValueError, "seed"), (dict(seed=-1), ValueError, "seed")):
        with pytest.raises(error, match=name):
            Kron([p], **kwargs)
    opt = Kron([p], backend="torch")
    p.grad = torch.eye(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    c = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    c.grad = torch.randn(3, dtype=torch.complex64)
    with pytest.raises(TypeError, match="complex"):
        Kron([c], backend="torch").step()
