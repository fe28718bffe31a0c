"""Token streams for the pretraining benchmark: the bundled Shakespeare corpus (byte-level, vocab 256), any
text file (bytes), or a pre-tokenised ``.bin`` of uint16/uint32 ids; the last 5% held out.

Batches are a pure function of (seed, step): random windows drawn by a generator seeded per step, so a run
resumed from a checkpoint sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

BUNDLED = Path(__file__).parent / "data" / "shakespeare.txt.gz"
HELD_OUT = 0.05


def load_tokens(path: str | Path | None = None, token_dtype: str = "uint16") -> tuple[torch.Tensor, int]:
    """(all token ids as int64, vocabulary size). Text (optionally .gz) is read as bytes; ``.bin`` as
    ``token_dtype`` ids (its vocabulary: the largest id + 1)."""
    path = Path(path) if path is not None else BUNDLED
    if not path.is_file():
        raise FileNotFoundError(f"no corpus at {path}")
    if path.suffix == ".bin":
        if token_dtype not in ("uint16", "uint32"):
            raise ValueError(f"token_dtype must be uint16 or uint32, got {token_dtype!r}")
        ids = torch.from_numpy(np.fromfile(path, dtype=np.dtype(token_dtype)).astype(np.int64))
        return ids, int(ids.max()) + 1
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long(), 256


class Corpus:
    """Train and held-out token streams, and the batches drawn from them."""

    def __init__(self, tokens: torch.Tensor, vocab: int, seq_len: int):
        split = int(len(tokens) * (1 - HELD_OUT))
        self.train, self.held_out, self.vocab, self.seq_len = tokens[:split], tokens[split:], vocab, seq_len
        if len(self.held_out) <= seq_len:
            raise ValueError(f"the corpus ({len(tokens)} tokens) is too short for sequences of {seq_len}")

    def batch(self, seed: int, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, next-token targets), each (batch_size, seq_len), for training step ``step``."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(len(self.train) - self.seq_len - 1, (batch_size,), generator=generator)
        return _windows(self.train, starts, self.seq_len)

    def held_out_batches(self, tokens: int, batch_size: int):
        """Evenly spaced held-out windows covering about ``tokens`` tokens, the same ones for every run."""
        count = max(1, min(tokens // self.seq_len, (len(self.held_out) - 1) // self.seq_len))
        starts = torch.linspace(0, len(self.held_out) - self.seq_len - 1, count).long()
        for chunk in starts.split(batch_size):
            yield _windows(self.held_out, chunk, self.seq_len)


def _windows(stream: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = starts[:, None] + torch.arange(seq_len + 1)
    window = stream[index]
    return window[:, :-1], window[:, 1:]
