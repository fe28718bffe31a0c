"""Drop-in behaviour of fastopt's optimizers as torch.optim optimizers."""

import copy
import io
import pickle

import pytest
import torch

import fastopt
from fastopt import backends

BACKEND = "cpu"


def state_bits(x):
    """A state tensor as comparable bits: fp8 codes as uint8 (torch.equal has no float8 kernel)."""
    return x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x


def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 8))


def batch(step):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 64, generator=gen), torch.randn(16, 8, generator=gen)


def train(m, opt, steps, start=0, scheduler=None):
    for step in range(start, start + steps):
        x, y = batch(step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def assert_same_params(a, b, **tol):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, **tol)


def hand_over(first, second):
    """5 steps with optimizer ``first``; its state_dict loaded into ``second`` on a copy of the model; 5 more
    steps on both (the uninterrupted run and the handed-over one). Returns (m1, o1, m2, o2, state_dict)."""
    m1 = model()
    o1 = first(m1)
    train(m1, o1, 5)
    sd = o1.state_dict()
    m2 = copy.deepcopy(m1)
    o2 = second(m2)
    o2.load_state_dict(copy.deepcopy(sd))
    train(m1, o1, 5, start=5)
    train(m2, o2, 5, start=5)
    return m1, o1, m2, o2, sd


@pytest.mark.parametrize("direction", ["torch->fastopt", "fastopt->torch"])
def test_state_dict_moves_between_torch_and_fastopt(direction):
    def make_torch(m):
        return torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)

    def make_ours(m):
        return fastopt.AdamW(m.parameters(), lr=1e-2, backend=BACKEND)

    first, second = (make_torch, make_ours) if direction == "torch->fastopt" else (make_ours, make_torch)
    m1, o1, m2, o2, sd = hand_over(first, second)
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert_same_params(m1, m2, rtol=1e-4, atol=1e-5)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert float(o1.state[p1]["step"]) == float(o2.state[p2]["step"]) == 10


@pytest.mark.parametrize("direction", ["lion_pytorch->fastopt", "fastopt->lion_pytorch"])
def test_lion_state_dict_moves_between_lion_pytorch_and_fastopt(direction):
    lion_pytorch = pytest.importorskip("lion_pytorch")
    makers = {"lion_pytorch": lambda m: lion_pytorch.Lion(m.parameters(), lr=1e-3, weight_decay=0.1),
              "fastopt": lambda m: fastopt.Lion(m.parameters(), lr=1e-3, weight_decay=0.1, backend=BACKEND)}
    first, second = (makers[name] for name in direction.split("->"))
    m1, _, m2, _, sd = hand_over(first, second)
    assert "exp_avg" in sd["state"][0]
    assert_same_params(m1, m2, rtol=1e-5, atol=1e-6)


def test_matches_torch_fused_over_a_training_run():
    m1, m2 = model(), model()
    train(m1, torch.optim.AdamW(m1.parameters(), lr=1e-2, fused=True), 20)
    train(m2, fastopt.AdamW(m2.parameters(), lr=1e-2, backend=BACKEND), 20)
    assert_same_params(m1, m2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make_scheduler", [
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=10),
    lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / 3)),
])
def test_lr_schedulers(make_scheduler):
    m1, m2 = model(), model()
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-2, fused=True)
    o2 = fastopt.AdamW(m2.parameters(), lr=1e-2, backend=BACKEND)
    train(m1, o1, 8, scheduler=make_scheduler(o1))
    train(m2, o2, 8, scheduler=make_scheduler(o2))
    assert_same_params(m1, m2, rtol=1e-4, atol=1e-5)


def test_add_param_group_and_per_group_hyperparameters():
    m = model()
    first, second = list(m[0].parameters()), list(m[2].parameters())
    opt = fastopt.AdamW(first, lr=1e-2, backend=BACKEND)
    opt.add_param_group({"params": second, "lr": 0.0, "weight_decay": 0.0})
    before = [p.detach().clone() for p in second]
    train(m, opt, 3)
    assert all(torch.equal(a, b) for a, b in zip(before, second))  # lr 0, no decay: unchanged
    assert all(float(opt.state[p]["step"]) == 3 for p in first + second)


def test_zero_grad_and_closure():
    m = model()
    opt = fastopt.AdamW(m.parameters(), lr=1e-2, backend=BACKEND)
    x, y = batch(0)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(m(x), y)
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(5)]
    assert losses[-1] < losses[0]
    opt.zero_grad()
    assert all(p.grad is None for p in m.parameters())


def test_grad_scaler_skips_inf_steps_and_unscales():
    m1, m2 = model(), model()
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-2, fused=True)
    o2 = fastopt.AdamW(m2.parameters(), lr=1e-2, backend=BACKEND)
    for m, o in ((m1, o1), (m2, o2)):
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for step in range(6):
            x, y = batch(step)
            o.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
            if step == 2:
                next(m.parameters()).grad[0, 0] = float("inf")
            scaler.step(o)
            scaler.update()
    assert_same_params(m1, m2, rtol=1e-4, atol=1e-5)
    assert all(float(o2.state[p]["step"]) == 5 for p in m2.parameters())  # the inf step was skipped


@pytest.mark.parametrize("state_dtype", ["fp32", "bf16", "fp8"])
def test_deepcopy_and_pickle(state_dtype):
    m = model()
    opt = fastopt.AdamW(m.parameters(), lr=1e-2, backend=BACKEND, state_dtype=state_dtype)
    train(m, opt, 2)
    clone = copy.deepcopy(opt)
    restored = pickle.loads(pickle.dumps(opt))
    for other in (clone, restored):
        assert other.state_dtype == state_dtype and other.backend == BACKEND
        for a, b in zip(opt.state.values(), other.state.values()):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("state_dtype", ["bf16", "fp8"])
def test_fp32_checkpoint_loads_into_quantized_state(state_dtype):
    m = torch.nn.Linear(128, 96)  # 12288 weights: quantized; 96 biases: fp32
    opt = fastopt.AdamW(m.parameters(), lr=1e-2, backend=BACKEND)
    train_linear(m, opt)
    low = fastopt.AdamW(m.parameters(), lr=1e-2, backend=BACKEND, state_dtype=state_dtype)
    low.load_state_dict(opt.state_dict())
    w = m.weight
    stored = low.state[w]["exp_avg"]
    assert stored.dtype == {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[state_dtype]
    assert low.state[m.bias]["exp_avg"].dtype == torch.float32
    # converted values: within the storage format's precision
    back = fastopt.AdamW(m.parameters(), lr=1e-2, backend=BACKEND)
    back.load_state_dict(low.state_dict())
    for name in ("exp_avg", "exp_avg_sq"):
        exact, approx = opt.state[w][name], back.state[w][name]
        assert approx.dtype == torch.float32
        rel = 2**-8 if state_dtype == "bf16" else 2**-3
        assert ((approx - exact).abs() <= rel * exact.abs().amax() + 1e-12).all()


def train_linear(m, opt, steps=3):
    for step in range(steps):
        x = torch.randn(8, m.in_features, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()


def test_fp8_checkpoint_round_trips_exactly():
    m = torch.nn.Linear(128, 96)
    opt = fastopt.AdamW(m.parameters(), lr=1e-2, backend=BACKEND, state_dtype="fp8", amsgrad=True)
    train_linear(m, opt)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    again = fastopt.AdamW(m.parameters(), lr=1e-2, backend=BACKEND, state_dtype="fp8", amsgrad=True)
    again.load_state_dict(torch.load(buffer))
    for p in m.parameters():
        a, b = opt.state[p], again.state[p]
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.float8_e4m3fn
                                                            else a[k], b[k].view(torch.uint8)
                                                            if b[k].dtype == torch.float8_e4m3fn else b[k])


@pytest.mark.parametrize("state_dtype,bytes_per_param", [("fp32", 8.0), ("bf16", 4.0), ("fp8", 2.1)])
def test_state_bytes_per_param(state_dtype, bytes_per_param):
    p = torch.nn.Parameter(torch.randn(1024, 1024))
    p.grad = torch.randn_like(p)
    opt = fastopt.AdamW([p], backend=BACKEND, state_dtype=state_dtype)
    opt.step()
    moments = sum(t.numel() * t.element_size() for k, t in opt.state[p].items() if k != "step")
    assert moments / p.numel() <= bytes_per_param


@pytest.mark.parametrize("state_dtype", ["fp32", "bf16", "fp8"])
def test_mars_keeps_last_grad_for_matrices_only(state_dtype):
    """MARS stores g_{t-1} in the state dtype, and only where it uses it (1-D tensors take AdamW); an fp32
    checkpoint loads into any state dtype and a same-format one round-trips bit for bit."""
    m = torch.nn.Linear(128, 96)
    opt = fastopt.MARS(m.parameters(), backend=BACKEND, state_dtype=state_dtype)
    train_linear(m, opt)
    assert set(opt.state[m.bias]) == {"step", "exp_avg", "exp_avg_sq"}
    stored = opt.state[m.weight]["last_grad"]
    assert stored.dtype == opt.state[m.weight]["exp_avg"].dtype and stored.shape == m.weight.shape
    per_param = {"fp32": 12.0, "bf16": 6.0, "fp8": 3.1}[state_dtype]
    weight_bytes = sum(t.numel() * t.element_size() for k, t in opt.state[m.weight].items() if k != "step")
    assert weight_bytes / m.weight.numel() <= per_param
    again = fastopt.MARS(m.parameters(), backend=BACKEND, state_dtype=state_dtype)
    again.load_state_dict(opt.state_dict())
    for p in m.parameters():
        for k, t in opt.state[p].items():
            assert torch.equal(state_bits(t), state_bits(again.state[p][k]))
    if state_dtype != "fp32":
        full = fastopt.MARS(m.parameters(), backend=BACKEND)
        train_linear(m, full)
        again.load_state_dict(full.state_dict())
        assert again.state[m.weight]["last_grad"].dtype == stored.dtype


@pytest.mark.parametrize("state_dtype", ["fp32", "fp8"])
def test_sophia_hessian_state_and_checkpoint(state_dtype):
    """update_hessian keeps h in the state dtype (fp8: signed, linear), steps leave it alone, and a checkpoint
    round-trips bit for bit; bad estimates are refused."""
    m = torch.nn.Linear(128, 96)
    opt = fastopt.Sophia(m.parameters(), lr=1e-3, backend=BACKEND, state_dtype=state_dtype)
    train_linear(m, opt, steps=1)
    opt.update_hessian()  # the last grads as a Gauss-Newton-Bartlett estimate
    h = opt.state[m.weight]["hessian"]
    assert h.dtype == opt.state[m.weight]["exp_avg"].dtype
    value = opt._moment_value(opt.state[m.weight], "hessian", m.weight)
    torch.testing.assert_close(value, 0.01 * m.weight.grad.square(), rtol=0.07 if state_dtype == "fp8" else 1e-6,
                               atol=0.01 * m.weight.grad.square().max().item() / 2**7)
    before = {k: t.clone() for k, t in opt.state[m.weight].items()}
    train_linear(m, opt, steps=2)
    assert torch.equal(opt.state[m.weight]["hessian"].view(torch.uint8) if state_dtype == "fp8" else
                       opt.state[m.weight]["hessian"], before["hessian"].view(torch.uint8)
                       if state_dtype == "fp8" else before["hessian"])
    again = fastopt.Sophia(m.parameters(), lr=1e-3, backend=BACKEND, state_dtype=state_dtype)
    again.load_state_dict(opt.state_dict())
    for k, t in opt.state[m.weight].items():
        assert torch.equal(state_bits(t), state_bits(again.state[m.weight][k]))
    with pytest.raises(ValueError, match="2 estimates for 3 parameters|1 estimates for 2 parameters"):
        opt.update_hessian([None])
    with pytest.raises(ValueError, match="estimate of shape"):
        opt.update_hessian([torch.zeros(3), None])


COMPILED = {"adamw": (lambda ps, **kw: fastopt.AdamW(ps, lr=1e-2, **kw), "adam_step"),
            "cautious-lion": (lambda ps, **kw: fastopt.Lion(ps, lr=1e-3, cautious=True, **kw), "lion_step"),
            "mars": (lambda ps, **kw: fastopt.MARS(ps, lr=1e-2, **kw), "mars_step"),
            "sophia": (lambda ps, **kw: fastopt.Sophia(ps, lr=1e-2, **kw), "sophia_step")}


@pytest.mark.parametrize("backend", [BACKEND, *(["triton"] if backends.triton_interpreting() else [])])
@pytest.mark.parametrize("rule", COMPILED)
def test_torch_compile_sees_the_fused_op_without_graph_breaks(backend, rule):
    """Runs for triton too in test_backends' TRITON_INTERPRET=1 subprocess."""
    make, op_name = COMPILED[rule]
    m = model()
    opt = make(m.parameters(), backend=backend)
    train(m, opt, 1)  # state initialised eagerly, as torch's own optimizers recommend

    explanation = torch._dynamo.explain(opt.step)()
    assert explanation.graph_break_count == 0
    targets = [str(n.target) for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"]
    op = f"fastopt.{op_name}_triton_" if backend == "triton" else f"fastopt.{op_name}_"
    assert op in targets or op + ".default" in targets, targets

    reference_model = copy.deepcopy(m)
    reference_opt = make(reference_model.parameters(), backend=backend)
    reference_opt.load_state_dict(opt.state_dict())
    compiled_step = torch.compile(opt.step, backend="aot_eager", fullgraph=True)
    for step in range(1, 4):
        for mm, stepper in ((m, compiled_step), (reference_model, reference_opt.step)):
            x, y = batch(step)
            mm.zero_grad()
            torch.nn.functional.mse_loss(mm(x), y).backward()
            stepper()
    assert_same_params(m, reference_model, rtol=1e-6, atol=1e-7)
