"""fastopt: fused-kernel drop-in replacements for torch.optim."""

from __future__ import annotations

from .optim import MARS, ROOT, SOAP, AdamMini, AdamW, FusedOptimizer, Kron, Lion, Muon, NAdamW, Scion, Sophia
from .optim.groups import create_optimizer, param_groups, param_roles

__version__ = "0.1.0"

OPTIMIZERS = {"adamw": AdamW, "nadamw": NAdamW, "lion": Lion, "mars": MARS, "sophia": Sophia, "adam-mini": AdamMini,
              "muon": Muon, "scion": Scion, "root": ROOT, "soap": SOAP, "kron": Kron}


def info() -> dict:
    """Versions, devices and backend availability (what ``python -m fastopt info`` prints)."""
    from ._info import collect

    return collect()


__all__ = ["AdamW", "NAdamW", "Lion", "MARS", "Sophia", "AdamMini", "Muon", "Scion", "ROOT", "SOAP", "Kron",
           "FusedOptimizer", "OPTIMIZERS", "create_optimizer", "param_groups", "param_roles", "info", "__version__"]
