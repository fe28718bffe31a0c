"""fastopt.param_groups / create_optimizer: every parameter of a mixed model gets the intended role and rule."""

import math

import pytest
import torch
from torch import nn

import fastopt
from fastopt.ops import newton_schulz


class Mixed(nn.Module):
    """Embeddings, a conv, linears with biases, a norm and an untied vocabulary head."""

    def __init__(self, vocab=40, width=16, tied=False):
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.conv = nn.Conv1d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, 2 * width)
        self.norm = nn.LayerNorm(2 * width)
        self.proj = nn.Linear(2 * width, width, bias=False)
        self.head = nn.Linear(width, vocab, bias=False)
        if tied:
            self.head.weight = self.wte.weight

    def forward(self, tokens):
        x = self.wte(tokens)
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        return self.head(self.proj(self.norm(self.fc(x))))


def train_step(model, opt, seed=0):
    tokens = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(seed))
    model(tokens).square().mean().backward()
    opt.step()
    opt.zero_grad()


def test_roles_by_module_type_and_tied_weights():
    assert fastopt.param_roles(Mixed()) == {
        "wte.weight": "embedding", "conv.weight": "hidden", "conv.bias": "vector", "fc.weight": "hidden",
        "fc.bias": "vector", "norm.weight": "vector", "norm.bias": "vector", "proj.weight": "hidden",
        "head.weight": "output"}
    tied = fastopt.param_roles(Mixed(tied=True))
    assert tied["wte.weight"] == "output" and "head.weight" not in tied  # one tensor, the output layer's rule

    class WithOutputEmbeddings(Mixed):  # the Hugging Face convention names the head
        def get_output_embeddings(self):
            return self.proj

    roles = fastopt.param_roles(WithOutputEmbeddings())
    assert roles["proj.weight"] == "output" and roles["head.weight"] == "hidden"

    class WithPositions(Mixed):  # a position table as long as a hidden width must not make that layer a head
        def __init__(self):
            super().__init__()
            self.wpe = torch.nn.Embedding(32, 16)

    roles = fastopt.param_roles(WithPositions())
    assert roles["wpe.weight"] == "embedding" and roles["fc.weight"] == "hidden" and roles["head.weight"] == "output"
    assert fastopt.param_roles(Mixed(), roles={"fc.weight": "output"})["fc.weight"] == "output"
    groups = fastopt.param_groups(Mixed())
    assert [g["role"] for g in groups] == ["hidden", "embedding", "output", "vector"]
    assert sum(len(g["params"]) for g in groups) == len(list(Mixed().parameters()))


def test_bad_roles():
    with pytest.raises(ValueError, match="not a trainable parameter"):
        fastopt.param_roles(Mixed(), roles={"nope.weight": "hidden"})
    with pytest.raises(ValueError, match="role of 'fc.weight' must be one of"):
        fastopt.param_roles(Mixed(), roles={"fc.weight": "matrix"})
    with pytest.raises(ValueError, match="unknown roles"):
        fastopt.create_optimizer(Mixed(), "muon", role_options={"matrix": {}})
    with pytest.raises(TypeError, match="model or params come first"):
        fastopt.create_optimizer("adamw", Mixed().parameters())
    with pytest.raises(ValueError, match="unknown optimizer"):
        fastopt.create_optimizer(Mixed(), "sgd9000")
    with pytest.raises(ValueError, match="need a model"):
        fastopt.create_optimizer(list(Mixed().parameters()), "adamw", roles={})


def test_muon_from_a_model_updates_each_parameter_by_the_intended_rule():
    """Hidden matrices (the conv flattened) take Muon, everything else AdamW; vectors without weight decay.
    Checked on the first step's values: AdamW's first step is lr·g/(|g| + eps) per element."""
    model = Mixed().double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, wd = 0.01, 0.1
    opt = fastopt.create_optimizer(model, "muon", lr=lr, weight_decay=wd, backend="torch")
    tokens = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(0))
    model(tokens).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    roles = fastopt.param_roles(model)
    for name, p in model.named_parameters():
        g, p0 = grads[name], before[name]
        if roles[name] == "hidden":
            assert set(opt.state[p]) == {"step", "momentum_buffer"}, name
            matrix = g.reshape(g.shape[0], -1)
            direction = newton_schulz(matrix.lerp(0.05 * matrix, 0.95), backend="torch", precision="fp64")
            scale = math.sqrt(max(1.0, matrix.shape[0] / matrix.shape[1]))
            expected = p0 * (1 - lr * wd) - lr * scale * direction.reshape(p.shape)
        else:
            assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}, name
            decay = 0.0 if roles[name] == "vector" else wd
            expected = p0 * (1 - lr * decay) - lr * g / (g.abs() + 1e-8)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("name", sorted(fastopt.OPTIMIZERS))
def test_every_optimizer_from_a_model(name):
    model = Mixed()
    kwargs = dict(dim=16, n_heads=2, unmatched="tensor") if name == "adam-mini" else {}
    opt = fastopt.create_optimizer(model, name, **kwargs)
    assert isinstance(opt, fastopt.OPTIMIZERS[name])
    before = [p.detach().clone() for p in model.parameters()]
    for seed in range(2):  # SOAP's first step only builds its bases
        train_step(model, opt, seed)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    if name not in ("adam-mini",):
        vector_group = next(g for g in opt.param_groups if g["role"] == "vector")
        assert vector_group.get("weight_decay", 0.0) == 0.0 and vector_group.get("weight_decay_1d", 0.0) == 0.0


def test_role_options_and_params_pass_through():
    opt = fastopt.create_optimizer(Mixed(), "scion", role_options={"output": {"scale": 50.0}})
    by_role = {g["role"]: g for g in opt.param_groups}
    assert by_role["output"]["norm"] == "sign" and by_role["output"]["scale"] == 50.0
    assert by_role["embedding"]["norm_kwargs"] == {"transpose": True} and by_role["hidden"]["scale"] == 1.0
    params = list(Mixed().parameters())
    plain = fastopt.create_optimizer(params, "AdamW", backend="torch")
    assert isinstance(plain, fastopt.AdamW) and len(plain.param_groups) == 1
