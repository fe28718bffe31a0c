"""fastopt: fused-kernel drop-in replacements for torch.optim."""

from __future__ import annotations

from .optim import MARS, AdamMini, AdamW, FusedOptimizer, Lion, Muon, NAdamW, Sophia

__version__ = "0.1.0"

OPTIMIZERS = {"adamw": AdamW, "nadamw": NAdamW, "lion": Lion, "mars": MARS, "sophia": Sophia, "adam-mini": AdamMini,
              "muon": Muon}


def create_optimizer(name: str, params, **kwargs):
    """Build an optimizer by its registry name (``fastopt.OPTIMIZERS``)."""
    try:
        cls = OPTIMIZERS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; fastopt has {sorted(OPTIMIZERS)}") from None
    return cls(params, **kwargs)


def info() -> dict:
    """Versions, devices and backend availability (what ``python -m fastopt info`` prints)."""
    from ._info import collect

    return collect()


__all__ = ["AdamW", "NAdamW", "Lion", "MARS", "Sophia", "AdamMini", "Muon", "FusedOptimizer", "OPTIMIZERS",
           "create_optimizer", "info", "__version__"]
