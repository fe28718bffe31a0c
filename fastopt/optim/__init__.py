"""fastopt's optimizers, one module per family."""

from .adam_mini import AdamMini
from .adamw import AdamW, NAdamW
from .base import FusedOptimizer
from .kron import Kron
from .lion import Lion
from .mars import MARS
from .muon import Muon
from .root import ROOT
from .scion import Scion
from .soap import SOAP
from .sophia import Sophia

__all__ = ["AdamW", "NAdamW", "Lion", "MARS", "Sophia", "AdamMini", "Muon", "Scion", "ROOT", "SOAP", "Kron",
           "FusedOptimizer"]
