"""The paper's speed-up: fit AdamW's final loss against its token budget, L(D) = α·D^(−B) + β, then an
optimizer reaching loss L at budget D has D_eff = ((L − β)/α)^(−1/B) and speed-up D_eff / D."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PowerLaw:
    alpha: float
    exponent: float  # B
    floor: float  # β

    def loss(self, tokens: float) -> float:
        return self.alpha * tokens ** -self.exponent + self.floor

    def tokens_for(self, loss: float) -> float:
        """D_eff: the budget at which the fit reaches ``loss`` (inf at or below the floor)."""
        if loss <= self.floor:
            return math.inf
        return ((loss - self.floor) / self.alpha) ** (-1 / self.exponent)

    def speedup(self, loss: float, tokens: float) -> float:
        return self.tokens_for(loss) / tokens


def fit_power_law(tokens, losses, grid: int = 4000) -> PowerLaw:
    """Least squares in L over β ∈ [0, min L) (for each β, α and B from a line in log-log space)."""
    tokens, losses = np.asarray(tokens, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    if len(tokens) < 3 or len(set(tokens.tolist())) < 3:
        raise ValueError(f"fitting L(D) = α·D^(−B) + β needs at least 3 budgets, got {len(set(tokens.tolist()))}")
    if not np.all(np.isfinite(losses)):
        raise ValueError(f"cannot fit non-finite losses {losses.tolist()}")
    best = None
    for floor in np.linspace(0.0, losses.min(), grid, endpoint=False):
        slope, intercept = np.polyfit(np.log(tokens), np.log(losses - floor), 1)
        law = PowerLaw(float(np.exp(intercept)), float(-slope), float(floor))
        error = float(np.sum((law.alpha * tokens ** -law.exponent + floor - losses) ** 2))
        if best is None or error < best[0]:
            best = (error, law)
    law = best[1]
    if law.exponent <= 0:
        raise ValueError(f"AdamW's loss does not fall with the budget ({losses.tolist()}): no speed-up can be read")
    return law
