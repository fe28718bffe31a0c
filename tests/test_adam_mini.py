"""Adam-mini: the partition into blocks, the update against its equations in fp64, and the size of
its state. (Every backend against the reference: tests/test_backends.py.)"""

import pytest
import torch

import fastopt
from test_optimizer import state_bits

DIM, HEADS, KV_HEADS = 64, 4, 2
SHAPES = {"embed.weight": (100, 64), "layers.0.attn.q_proj.weight": (64, 64), "layers.0.attn.k_proj.weight": (32, 64),
          "layers.0.attn.v_proj.weight": (32, 64), "layers.0.attn.o_proj.weight": (64, 64),
          "layers.0.mlp.up.weight": (173, 64), "layers.0.mlp.up.bias": (173,), "layers.0.mlp.down.weight": (64, 173),
          "layers.0.norm.weight": (64,), "lm_head.weight": (100, 64)}
# elements per second-moment block: 1 = full AdamW; a head of Q/K = DIM·DIM/HEADS; a row; the whole tensor
BLOCKS = {"embed.weight": 1, "layers.0.attn.q_proj.weight": 1024, "layers.0.attn.k_proj.weight": 1024,
          "layers.0.attn.v_proj.weight": 64, "layers.0.attn.o_proj.weight": 64, "layers.0.mlp.up.weight": 64,
          "layers.0.mlp.up.bias": 1, "layers.0.mlp.down.weight": 173, "layers.0.norm.weight": 64,
          "lm_head.weight": 1}


def named_params(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(n, torch.nn.Parameter((0.02 * torch.randn(s, generator=gen)).to(dtype))) for n, s in SHAPES.items()]


def adam_mini_by_hand(named, grads, lr, b1, b2, eps, wd):
    """The Adam-mini paper's algorithm in fp64: v per block = EMA of the block's mean g²; norms without decay."""
    ps = {n: p.detach().clone() for n, p in named}
    ms = {n: torch.zeros_like(p) for n, p in ps.items()}
    vs = {n: torch.zeros(p.numel() // BLOCKS[n], dtype=p.dtype) for n, p in ps.items()}
    for t, g in enumerate(grads, start=1):
        for n, p in ps.items():
            block = BLOCKS[n]
            gb = g[n].reshape(-1, block)
            ms[n] = b1 * ms[n] + (1 - b1) * g[n]
            vs[n] = b2 * vs[n] + (1 - b2) * (gb * gb).mean(dim=1)
            denom = (vs[n] / (1 - b2 ** t)).sqrt() + eps
            update = (ms[n].reshape(-1, block) / (1 - b1 ** t) / denom[:, None]).reshape(p.shape)
            decay = 0.0 if "norm" in n else wd
            ps[n] = p * (1 - lr * decay) - lr * update
    return ps


def test_matches_its_equations_in_fp64():
    named = named_params()
    gen = torch.Generator().manual_seed(1)
    grads = [{n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in SHAPES.items()} for _ in range(6)]
    expected = adam_mini_by_hand(named, grads, 1e-2, 0.9, 0.95, 1e-8, 0.1)
    opt = fastopt.AdamMini(named, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, dim=DIM, n_heads=HEADS,
                           n_kv_heads=KV_HEADS, backend="torch")
    for g in grads:
        for n, p in named:
            p.grad = g[n].clone()
        opt.step()
    for n, p in named:
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-12, atol=1e-15, msg=n)


def test_partition_and_small_state():
    """v is one fp32 value per block (the point of Adam-mini), not one per element."""
    named = named_params(torch.float32)
    opt = fastopt.AdamMini(named, dim=DIM, n_heads=HEADS, n_kv_heads=KV_HEADS, backend="cpu")
    for _, p in named:
        p.grad = torch.randn_like(p)
    opt.step()
    for n, p in named:
        state = opt.state[p]
        if BLOCKS[n] == 1:
            assert set(state) == {"step", "exp_avg", "exp_avg_sq"}, n
        else:
            assert set(state) == {"step", "exp_avg", "v_mean"}, n
            assert state["v_mean"].shape == (p.numel() // BLOCKS[n],) and state["v_mean"].dtype == torch.float32
    mini = [p for n, p in named if BLOCKS[n] > 1]
    v_bytes = sum(opt.state[p]["v_mean"].numel() * 4 for p in mini)
    assert v_bytes * 50 < sum(p.numel() * 4 for p in mini)  # here: 370 values for 28k elements
    no_decay = [g for g in opt.param_groups if g["weight_decay"] == 0.0]
    assert [len(g["params"]) for g in no_decay] == [1]  # the norm


def test_unclassified_matrices_are_refused_or_take_one_block():
    named = named_params(torch.float32) + [("layers.0.router.gate", torch.nn.Parameter(torch.zeros(8, 64)))]
    with pytest.raises(ValueError, match=r"layers\.0\.router\.gate \(8, 64\).*row_names"):
        fastopt.AdamMini(named, dim=DIM, n_heads=HEADS)
    opt = fastopt.AdamMini(named, dim=DIM, n_heads=HEADS, n_kv_heads=KV_HEADS, unmatched="tensor", backend="cpu")
    gate = named[-1][1]
    gate.grad = torch.ones_like(gate)
    opt.step()
    assert opt.state[gate]["v_mean"].shape == (1,)
    opt = fastopt.AdamMini(named, dim=DIM, n_heads=HEADS, n_kv_heads=KV_HEADS, row_names=("mlp", "proj", "router"))
    assert opt._segment(gate) == 64


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=64, n_heads=5), "divide"), (dict(dim=64, n_heads=4, n_kv_heads=3), "divide"),
    (dict(dim=0, n_heads=4), "dim must be"), (dict(dim=64, n_heads=4, unmatched="skip"), "unmatched")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastopt.AdamMini(named_params(torch.float32), **kwargs)
    with pytest.raises(TypeError, match="named_parameters"):
        fastopt.AdamMini([torch.nn.Parameter(torch.zeros(3))], dim=64, n_heads=4)


def test_checkpoint_copy_and_grad_scaler_skip():
    named = named_params(torch.float32)
    opt = fastopt.AdamMini(named, dim=DIM, n_heads=HEADS, n_kv_heads=KV_HEADS, backend="cpu", state_dtype="fp8")
    for _, p in named:
        p.grad = torch.randn_like(p)
    opt.step()
    again = fastopt.AdamMini(named, dim=DIM, n_heads=HEADS, n_kv_heads=KV_HEADS, backend="cpu", state_dtype="fp8")
    again.load_state_dict(opt.state_dict())
    for _, p in named:
        assert all(torch.equal(state_bits(opt.state[p][k]), state_bits(again.state[p][k])) for k in opt.state[p])
    import copy
    clone = copy.deepcopy(opt)
    clone.step()  # the copy finds its own parameters' blocks
    before = {k: t.clone() for k, t in opt.state[named[1][1]].items()}
    params_before = [p.detach().clone() for _, p in named]
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)  # as GradScaler sets them
    opt.step()
    for (_, p), q in zip(named, params_before):
        assert torch.equal(p, q)
    for k, t in opt.state[named[1][1]].items():
        assert torch.equal(state_bits(t), state_bits(before[k])), k


class TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(10, 16)
        self.q_proj = torch.nn.Linear(16, 16)
        self.mlp = torch.nn.Linear(16, 8)
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.mlp(self.q_proj(self.embed(x))))


def test_torch_compile_without_graph_breaks():
    m = TinyModel()
    opt = fastopt.AdamMini(m.named_parameters(), lr=1e-2, dim=16, n_heads=4, backend="cpu")
    x = torch.arange(10).reshape(2, 5)
    m(x).square().mean().backward()
    opt.step()
    explanation = torch._dynamo.explain(opt.step)()
    assert explanation.graph_break_count == 0
    targets = [str(n.target) for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("fastopt.adam_mini_step_" in t for t in targets), targets


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_step_never_synchronises_with_the_host(backend):
    """The per-block means, the v_mean EMA (skipped on found_inf) and the fused pass all stay on the device."""
    named = [(n, torch.nn.Parameter(p.detach().cuda())) for n, p in named_params(torch.float32)]
    from test_backends import assert_second_step_never_synchronises

    opt = fastopt.AdamMini(named, dim=DIM, n_heads=HEADS, n_kv_heads=KV_HEADS, backend=backend, state_dtype="bf16")
    assert_second_step_never_synchronises(opt, [p for _, p in named])
