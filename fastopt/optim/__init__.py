"""fastopt's optimizers, one module per family."""

from .adamw import AdamW, NAdamW
from .base import FusedOptimizer

__all__ = ["AdamW", "NAdamW", "FusedOptimizer"]
