"""fastopt's optimizers, one module per family."""

from .adamw import AdamW, NAdamW
from .base import FusedOptimizer
from .lion import Lion

__all__ = ["AdamW", "NAdamW", "Lion", "FusedOptimizer"]
