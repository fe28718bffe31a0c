"""A Llama-style decoder in plain torch for the pretraining benchmark: RMSNorm, rotary position
embeddings, SwiGLU MLP, untied input and output embeddings, no biases.

Presets run from CPU-sized models to the shapes of "Fantastic Pretraining Optimizers" (Wen et al. 2025):
130M / 300M / 520M / 1.2B (width 512/768/1024/1536, 32 layers, heads 8/12/16/24, sequence 4096).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LlamaConfig:
    width: int
    layers: int
    heads: int
    seq_len: int
    vocab: int = 256
    mlp_ratio: float = 4.0  # hidden = 2/3 · mlp_ratio · width (rounded up to 8): a gated MLP of 4× width's parameters

    @property
    def mlp_hidden(self) -> int:
        return -(-int(2 * self.mlp_ratio * self.width / 3) // 8) * 8


PRESETS = {
    "micro": LlamaConfig(width=32, layers=1, heads=2, seq_len=64),  # smoke tests
    # CPU sizes: byte vocabulary; ~0.1 and ~0.4 M non-embedding parameters
    "tiny": LlamaConfig(width=64, layers=2, heads=4, seq_len=128),
    "small": LlamaConfig(width=128, layers=2, heads=4, seq_len=256),
    # the paper's shapes (GPU); vocab of the Llama-3 tokenizer they used would be set with --vocab / .bin data
    "130m": LlamaConfig(width=512, layers=32, heads=8, seq_len=4096),
    "300m": LlamaConfig(width=768, layers=32, heads=12, seq_len=4096),
    "520m": LlamaConfig(width=1024, layers=32, heads=16, seq_len=4096),
    "1.2b": LlamaConfig(width=1536, layers=32, heads=24, seq_len=4096),
}


class RMSNorm(nn.Module):
    """x / rms(x) · g."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles t·base^(−2i/head_dim), each (seq_len, head_dim / 2)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def rotate(x, cos, sin):
    """Rotary embedding of (batch, heads, seq, head_dim): each pair (x1, x2) of the two halves turned by its angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.heads = config.heads
        self.q_proj = nn.Linear(config.width, config.width, bias=False)
        self.k_proj = nn.Linear(config.width, config.width, bias=False)
        self.v_proj = nn.Linear(config.width, config.width, bias=False)
        self.o_proj = nn.Linear(config.width, config.width, bias=False)

    def forward(self, x, cos, sin):
        batch, seq, width = x.shape
        q, k, v = (proj(x).view(batch, seq, self.heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(rotate(q, cos, sin), rotate(k, cos, sin), v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(batch, seq, width))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.width, config.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(config.width, config.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(config.mlp_hidden, config.width, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.width)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.width)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Token ids (batch, seq) → logits (batch, seq, vocab)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab, config.width)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = RMSNorm(config.width)
        self.lm_head = nn.Linear(config.width, config.vocab, bias=False)
        cos, sin = rotary_tables(config.seq_len, config.width // config.heads)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.apply(_init_weights)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, tokens):
        seq = tokens.shape[1]
        cos, sin = self.cos[:seq], self.sin[:seq]
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))

    def loss(self, tokens, targets):
        """Mean next-token cross-entropy."""
        logits = self(tokens)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def non_embedding_parameters(self) -> int:
        """Parameters outside the input and output embeddings (Chinchilla's N)."""
        embeddings = self.embed_tokens.weight.numel() + self.lm_head.weight.numel()
        return sum(p.numel() for p in self.parameters()) - embeddings


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
