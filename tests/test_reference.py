"""The reference (the torch backend) against independent ground truth, in float64."""

import math

import pytest
import torch

import fastopt
from fastopt.state import dequantize_e4m3, quantize_e4m3


def _run(opt_factory, params, grads):
    opt = opt_factory(params)
    for g in grads:
        for p, gp in zip(params, g):
            p.grad = gp.clone()
        opt.step()
    return params


def _problem(seed=0, steps=20):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (11,), ()]
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(steps)]
    return params, grads


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch_optim_in_fp64(amsgrad, maximize, weight_decay):
    params, grads = _problem()
    kwargs = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay, amsgrad=amsgrad,
                  maximize=maximize)
    ours = _run(lambda ps: fastopt.AdamW(ps, backend="torch", **kwargs), [p.clone() for p in params], grads)
    theirs = _run(lambda ps: torch.optim.AdamW(ps, foreach=False, **kwargs), [p.clone() for p in params], grads)
    for a, b in zip(ours, theirs):
        assert a.dtype == torch.float64
        rel = ((a - b).abs() / b.abs().clamp_min(1e-300)).max().item()
        assert rel <= 1e-10


def _nadamw_by_hand(params, grads, lr, b1, b2, eps, wd):
    """optax scale_by_adam(nesterov=True) + add_decayed_weights + scale(-lr), elementwise in fp64."""
    ps = [p.clone() for p in params]
    mu = [torch.zeros_like(p) for p in ps]
    nu = [torch.zeros_like(p) for p in ps]
    for t, g in enumerate(grads, start=1):
        for i, (p, gi) in enumerate(zip(ps, g)):
            mu[i] = b1 * mu[i] + (1 - b1) * gi
            nu[i] = b2 * nu[i] + (1 - b2) * gi * gi
            mu_hat = b1 * mu[i] / (1 - b1 ** (t + 1)) + (1 - b1) * gi / (1 - b1 ** t)
            nu_hat = nu[i] / (1 - b2 ** t)
            update = mu_hat / (nu_hat.sqrt() + eps) + wd * p
            ps[i] = p - lr * update
    return ps


def test_nadamw_matches_optax_equations_in_fp64():
    params, grads = _problem(seed=1)
    kwargs = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.05)
    ours = _run(lambda ps: fastopt.NAdamW(ps, backend="torch", **kwargs), [p.clone() for p in params], grads)
    expected = _nadamw_by_hand(params, grads, 1e-2, 0.9, 0.98, 1e-8, 0.05)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_first_steps_by_hand():
    """Step 1 of Adam is lr·sign(g) (eps aside); NAdamW's first step is (1 + β1/(1+β1))·lr·sign(g)."""
    g = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    for cls, factor in ((fastopt.AdamW, 1.0), (fastopt.NAdamW, 1 + 0.9 / 1.9)):
        p = torch.zeros(3, dtype=torch.float64)
        p.grad = g.clone()
        cls([p], lr=0.1, betas=(0.9, 0.999), eps=0.0, weight_decay=0.0, backend="torch").step()
        torch.testing.assert_close(p, -0.1 * factor * g.sign(), rtol=1e-14, atol=0)


def test_e4m3_codec_matches_torch_cast():
    x = torch.cat([torch.randn(200_000) * torch.exp(torch.randn(200_000) * 4), torch.linspace(-500, 500, 20001)])
    codes, scales = quantize_e4m3(x, 128)
    blocks = torch.nn.functional.pad(x, (0, codes.numel() % 128 and 128 - codes.numel() % 128)).view(-1, 128)
    absmax = blocks.abs().amax(1, keepdim=True)
    expected = (blocks * (448.0 / absmax)).clamp(-448, 448).to(torch.float8_e4m3fn).reshape(-1)[: x.numel()]
    assert torch.equal(codes.view(torch.uint8), expected.view(torch.uint8))
    torch.testing.assert_close(scales, (absmax / 448.0).view(-1))
    err = (dequantize_e4m3(codes, scales, 128) - x).abs().view(-1)
    bound = torch.repeat_interleave(scales, 128)[: x.numel()] * 16 * (1 + 1e-6)  # half an e4m3 ulp at the top binade
    assert (err <= bound).all()


def test_e4m3_zero_block_and_tail():
    x = torch.zeros(300)
    x[290] = 1.0
    codes, scales = quantize_e4m3(x, 256)
    assert scales.tolist() == [0.0, torch.tensor(1.0 / 448.0).item()]
    assert torch.equal(dequantize_e4m3(codes, scales, 256), x)
    assert math.isclose(float(dequantize_e4m3(codes, scales, 256)[290]), 1.0)


# ----------------------------------------------------------------------------- Lion and Cautious
def _lion_by_hand(params, grads, lr, b1, b2, wd, cautious=False):
    """The Lion paper's Algorithm 2 (decoupled weight decay), elementwise in fp64; cautious as in C-Optim's
    c_lion: the update is masked where it disagrees with the gradient and divided by the mean of the mask."""
    ps = [p.clone() for p in params]
    ms = [torch.zeros_like(p) for p in ps]
    for g in grads:
        for i, gi in enumerate(g):
            update = (b1 * ms[i] + (1 - b1) * gi).sign()
            if cautious:
                mask = (update * gi > 0).to(gi.dtype)
                update = update * mask / max(mask.mean().item(), 1e-3)
            ps[i] = ps[i] * (1 - lr * wd) - lr * update
            ms[i] = b2 * ms[i] + (1 - b2) * gi
    return ps


@pytest.mark.parametrize("cautious", [False, True])
def test_lion_matches_the_paper_in_fp64(cautious):
    params, grads = _problem(seed=2)
    kwargs = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.3)
    ours = _run(lambda ps: fastopt.Lion(ps, backend="torch", cautious=cautious, **kwargs),
                [p.clone() for p in params], grads)
    expected = _lion_by_hand(params, grads, 1e-2, 0.9, 0.99, 0.3, cautious)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_lion_matches_lion_pytorch():
    """lucidrains/lion-pytorch (the implementation the issue names), same state key ``exp_avg``."""
    lion_pytorch = pytest.importorskip("lion_pytorch")
    params, grads = _problem(seed=3)
    kwargs = dict(lr=3e-3, betas=(0.95, 0.98), weight_decay=0.1)
    ours = _run(lambda ps: fastopt.Lion(ps, backend="torch", **kwargs), [p.clone() for p in params], grads)
    theirs_params = [p.clone() for p in params]
    theirs_opt = lion_pytorch.Lion(theirs_params, **kwargs)
    for g in grads:
        for p, gp in zip(theirs_params, g):
            p.grad = gp.clone()
        theirs_opt.step()
    for a, b in zip(ours, theirs_params):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_lion_first_step_and_sign_of_zero():
    """Step 1 is lr·sign((1-β1)·g); a zero gradient coordinate does not move (sign(0) = 0)."""
    p = torch.zeros(4, dtype=torch.float64)
    p.grad = torch.tensor([0.5, -2.0, 0.0, 1e-30], dtype=torch.float64)
    fastopt.Lion([p], lr=0.1, backend="torch").step()
    assert p.tolist() == [-0.1, 0.1, 0.0, -0.1]


def _cautious_adamw_by_hand(params, grads, lr, b1, b2, eps, wd):
    """c_adamw.py's rule with the issue's normalisation: AdamW whose update u is kept where u·g > 0 and
    divided by max(mean(mask), 1e-3); decoupled weight decay as torch.optim.AdamW."""
    ps = [p.clone() for p in params]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    for t, g in enumerate(grads, start=1):
        for i, gi in enumerate(g):
            ms[i] = b1 * ms[i] + (1 - b1) * gi
            vs[i] = b2 * vs[i] + (1 - b2) * gi * gi
            u = lr / (1 - b1 ** t) * ms[i] / ((vs[i] / (1 - b2 ** t)).sqrt() + eps)
            mask = (u * gi > 0).to(gi.dtype)
            ps[i] = ps[i] * (1 - lr * wd) - u * mask / max(mask.mean().item(), 1e-3)
    return ps


def test_cautious_adamw_matches_its_equations_in_fp64():
    params, grads = _problem(seed=4)
    ours = _run(lambda ps: fastopt.AdamW(ps, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                         cautious=True, backend="torch"), [p.clone() for p in params], grads)
    expected = _cautious_adamw_by_hand(params, grads, 1e-2, 0.9, 0.95, 1e-8, 0.1)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_cautious_mask_normalisation():
    """On step 1 (m = 0) every coordinate agrees: plain Lion. With half of them agreeing, the kept half
    moves twice as far and the rest stays."""
    p = torch.ones(4, dtype=torch.float64)
    opt = fastopt.Lion([p], lr=0.1, betas=(0.0, 0.0), weight_decay=0.0, cautious=True, backend="torch")
    p.grad = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    opt.step()  # m = 0: u = lr·sign(g) agrees with g everywhere
    assert p.tolist() == [0.9, 1.1, 0.9, 1.1]
    opt = fastopt.Lion([p], lr=0.1, betas=(1.0 - 1e-12, 0.0), weight_decay=0.0, cautious=True, backend="torch")
    opt.state[p]["exp_avg"] = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    opt.state[p]["step"] = torch.zeros(())
    p.grad = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)  # u = lr·sign(m): agrees on 0 and 2
    opt.step()
    torch.testing.assert_close(p, torch.tensor([0.7, 1.1, 1.1, 1.1], dtype=torch.float64))


def _mars_by_hand(params, grads, lr, b1, b2, eps, wd, gamma, lr_1d, betas_1d, wd_1d):
    """MARS-AdamW from the paper's Algorithm (approximate form: g_{t-1} is the previous step's gradient,
    zero before the first), and AdamW with betas_1d / lr_1d / wd_1d for tensors of fewer than 2 dims."""
    ps = [p.clone() for p in params]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    prev = [torch.zeros_like(p) for p in ps]
    for t, g in enumerate(grads, start=1):
        for i, gi in enumerate(g):
            if ps[i].ndim >= 2:
                beta1, beta2, step_lr, decay = b1, b2, lr, wd
                c = gi + gamma * b1 / (1 - b1) * (gi - prev[i])
                norm = c.norm().item()
                c = c / norm if norm > 1 else c
            else:
                (beta1, beta2), step_lr, decay, c = betas_1d, lr_1d, wd_1d, gi
            prev[i] = gi
            ms[i] = beta1 * ms[i] + (1 - beta1) * c
            vs[i] = beta2 * vs[i] + (1 - beta2) * c * c
            m_hat, v_hat = ms[i] / (1 - beta1 ** t), vs[i] / (1 - beta2 ** t)
            ps[i] = ps[i] * (1 - step_lr * decay) - step_lr * m_hat / (v_hat.sqrt() + eps)
    return ps


def _mars_problem(seed):
    """A matrix whose corrected gradient is clipped (norm > 1), one that is not, a 3-D tensor, vectors."""
    gen = torch.Generator().manual_seed(seed)
    shapes, scales = [(7, 5), (3, 4), (2, 3, 4), (11,), ()], [1.0, 0.01, 1.0, 1.0, 1.0]
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[k * torch.randn(s, generator=gen, dtype=torch.float64) for s, k in zip(shapes, scales)]
             for _ in range(10)]
    return params, grads


def test_mars_matches_the_paper_in_fp64():
    params, grads = _mars_problem(seed=5)
    kwargs = dict(lr=1e-2, betas=(0.95, 0.99), eps=1e-8, weight_decay=0.1, gamma=0.025)
    ours = _run(lambda ps: fastopt.MARS(ps, lr_1d=3e-3, betas_1d=(0.9, 0.95), weight_decay_1d=0.2, backend="torch",
                                        **kwargs), [p.clone() for p in params], grads)
    expected = _mars_by_hand(params, grads, 1e-2, 0.95, 0.99, 1e-8, 0.1, 0.025, 3e-3, (0.9, 0.95), 0.2)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    # the small matrix is never clipped, the large one always: both branches ran
    assert max(torch.linalg.vector_norm(g[1]) for g in grads) * (1 + 0.025 * 0.95 / 0.05 * 2) < 1
    assert min(torch.linalg.vector_norm(g[0]) for g in grads) > 1.5


def test_mars_matches_pytorch_optimizer():
    """pytorch-optimizer's MARS (a port of AGI-Arena/MARS that, like fastopt, sends every tensor of 2+ dims to
    MARS). It adds eps before dividing by sqrt(1-β2^t), the official code after, and 1e-15 to v: eps=0
    compares the rest, to the relative size of that 1e-15."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    params, grads = _mars_problem(seed=6)
    kwargs = dict(lr=3e-3, betas=(0.95, 0.99), eps=0.0, weight_decay=0.1, gamma=0.025, lr_1d=1e-3,
                  betas_1d=(0.9, 0.95), weight_decay_1d=0.1)
    ours = _run(lambda ps: fastopt.MARS(ps, backend="torch", **kwargs), [p.clone() for p in params], grads)
    theirs = _run(lambda ps: pytorch_optimizer.MARS(ps, foreach=False, **kwargs), [p.clone() for p in params], grads)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-15)


def test_mars_first_step_by_hand():
    """Step 1, g_prev = 0: c = (1 + γβ1/(1-β1))·g, clipped to norm 1; m̂ = c, v̂ = c², so p moves by lr·sign(c)
    (eps = 0). A 3-D tensor takes MARS too (the official code would send it to AdamW: no clipping)."""
    for shape in [(1, 2), (1, 1, 2)]:
        p = torch.zeros(shape, dtype=torch.float64)
        p.grad = torch.tensor([3.0, -4.0], dtype=torch.float64).view(shape)
        opt = fastopt.MARS([p], lr=0.1, eps=0.0, gamma=0.05, betas=(0.5, 0.9), backend="torch")
        opt.step()
        torch.testing.assert_close(p.flatten(), torch.tensor([-0.1, 0.1], dtype=torch.float64), rtol=1e-15, atol=0)
        # c = 1.05·g has norm 5.25 > 1: m = (1-β1)·c/‖c‖
        torch.testing.assert_close(opt.state[p]["exp_avg"].flatten(),
                                   torch.tensor([0.5 * 0.6, 0.5 * -0.8], dtype=torch.float64))
        assert torch.equal(opt.state[p]["last_grad"], p.grad)


def test_mars_last_grad_is_a_copy():
    """zero_grad(set_to_none=False) zeroes .grad in place; the stored g_{t-1} must survive it."""
    p = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    opt = fastopt.MARS([p], backend="torch")
    p.grad = torch.ones(2, 2, dtype=torch.float64)
    opt.step()
    opt.zero_grad(set_to_none=False)
    assert torch.equal(opt.state[p]["last_grad"], torch.ones(2, 2, dtype=torch.float64))


def test_exact_mars_uses_update_last_grad():
    """is_approx=False: g_{t-1} is what update_last_grad() stored, and step() refuses to run without it."""
    p = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    opt = fastopt.MARS([p], backend="torch", is_approx=False)
    p.grad = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="update_last_grad"):
        opt.step()
    g = p.grad
    p.grad = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)  # the gradient at the previous point
    opt.update_last_grad()
    p.grad = g
    opt.step()
    c = g + 0.025 * 0.95 / 0.05 * (g - torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(opt.state[p]["exp_avg"], 0.05 * c / c.norm(), rtol=1e-14, atol=0)
    with pytest.raises(RuntimeError, match="update_last_grad"):
        opt.step()  # needed again before every step
    with pytest.raises(RuntimeError, match="is_approx=False"):
        fastopt.MARS([p], backend="torch").update_last_grad()


def _sophia_by_hand(params, grads, hessian_grads, lr, b1, b2, rho, wd, bs, k):
    """SophiaG as in Liuhong99/Sophia: every k steps (from step 0) h ← β2·h + (1-β2)·ĝ² with ĝ the gradient
    of the sampled-label loss; each step m ← β1·m + (1-β1)·g and
    p ← p·(1 - lr·wd) - lr·sign(m)·min(|m| / (ρ·bs·h + 1e-15), 1)."""
    ps = [p.clone() for p in params]
    ms = [torch.zeros_like(p) for p in ps]
    hs = [torch.zeros_like(p) for p in ps]
    for t, g in enumerate(grads):
        if t % k == 0:
            hs = [b2 * h + (1 - b2) * gh * gh for h, gh in zip(hs, hessian_grads[t])]
        for i, gi in enumerate(g):
            ms[i] = b1 * ms[i] + (1 - b1) * gi
            ratio = (ms[i].abs() / (rho * bs * hs[i] + 1e-15)).clamp(max=1)
            ps[i] = ps[i] * (1 - lr * wd) - lr * ms[i].sign() * ratio
    return ps


def test_sophia_matches_the_official_update_in_fp64():
    params, grads = _problem(seed=7, steps=12)
    hessian_grads = _problem(seed=8, steps=12)[1]
    kwargs = dict(lr=1e-2, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1)
    ps = [p.clone() for p in params]
    opt = fastopt.Sophia(ps, bs=1.0, backend="torch", **kwargs)
    for t, g in enumerate(grads):
        if t % 3 == 0:
            for p, gh in zip(ps, hessian_grads[t]):
                p.grad = gh.clone()
            opt.update_hessian()
        for p, gp in zip(ps, g):
            p.grad = gp.clone()
        opt.step(bs=100.0)  # per-step bs, as the official step(bs=...)
    expected = _sophia_by_hand(params, grads, hessian_grads, 1e-2, 0.965, 0.99, 0.04, 0.1, 100.0, 3)
    for a, b in zip(ps, expected):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    # both branches of the clip were taken
    ratios = [(opt.state[p]["exp_avg"].abs() / (0.04 * 100.0 * opt.state[p]["hessian"] + 1e-15)) for p in ps]
    assert any((r > 1).any() for r in ratios) and any((r < 1).any() for r in ratios)


def test_sophia_first_step_and_negative_hessian():
    """h = 0: the step is lr·sign(m) (signSGD). A negative h (a Hutchinson estimate) gives the clipped step
    too, where the official formula's negative denominator would flip the update's sign."""
    p = torch.zeros(3, dtype=torch.float64)
    opt = fastopt.Sophia([p], lr=0.1, weight_decay=0.0, bs=10, backend="torch")
    p.grad = torch.tensor([2.0, -3.0, 0.0], dtype=torch.float64)
    opt.step()
    assert p.tolist() == [-0.1, 0.1, 0.0]
    opt.update_hessian([torch.tensor([-100.0, 1e6, 1.0], dtype=torch.float64)])
    p.grad = torch.tensor([2.0, -3.0, 0.0], dtype=torch.float64)
    before = p.clone()
    opt.step()
    m = opt.state[p]["exp_avg"]
    h = opt.state[p]["hessian"]
    torch.testing.assert_close(h, 0.01 * torch.tensor([-100.0, 1e6, 1.0], dtype=torch.float64))
    expected = before - 0.1 * torch.stack([m[0].sign(), m[1] / (0.04 * 10 * h[1]), m[2] / (0.04 * 10 * h[2])])
    torch.testing.assert_close(p, expected, rtol=1e-14, atol=1e-16)


def test_hutchinson_estimates_the_hessian_diagonal():
    """For L = ½ xᵀAx the Hessian is A: u ⊙ (A u) with a Rademacher u, exactly; its mean is diag(A)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    a = a @ a.T
    x = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    frozen = torch.zeros(2, dtype=torch.float64)
    probe_gen = torch.Generator().manual_seed(3)
    (estimate, none) = fastopt.optim.sophia.hutchinson_estimates(0.5 * x @ a @ x, [x, frozen], probe_gen)
    u = torch.randint(0, 2, (5,), generator=torch.Generator().manual_seed(3)).to(torch.float64) * 2 - 1
    torch.testing.assert_close(estimate, u * (a @ u), rtol=1e-14, atol=1e-14)
    assert none is None
    mean = sum(fastopt.optim.sophia.hutchinson_estimates(0.5 * x @ a @ x, [x], probe_gen)[0] for _ in range(4000))
    torch.testing.assert_close(mean / 4000, a.diagonal(), rtol=0.1, atol=0.1 * a.abs().max().item())
