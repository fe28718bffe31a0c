"""Readable single-tensor math of every optimizer in plain torch.

It is the oracle every kernel is tested against (run it on float64 tensors for ground
truth) and it is the ``torch`` backend. Each function has the signature of the fused op
it specifies and updates its arguments in place; ``soap_step`` is SOAP's whole step on one
tensor (the oracle of the coming fastopt.SOAP).
"""

from .adam import adam_step
from .adam_mini import adam_mini_step
from .lion import lion_step
from .mars import mars_step
from .newton_schulz import newton_schulz
from .soap import soap_step
from .sophia import sophia_step

__all__ = ["adam_step", "adam_mini_step", "lion_step", "mars_step", "newton_schulz", "soap_step", "sophia_step"]
