"""A model's parameters split by role, and optimizers built from them.

Roles: ``"embedding"`` (weights of ``nn.Embedding`` / ``nn.EmbeddingBag``), ``"output"`` (the layer
that maps hidden states to the vocabulary: ``model.get_output_embeddings()`` where the model has it,
else the last ``nn.Linear`` whose ``out_features`` is the largest embedding's ``num_embeddings``; a
weight tied to an embedding counts as output, as in Scion's weight-sharing nanoGPT), ``"hidden"`` (every other
parameter with two or more dimensions: linear and conv weights) and ``"vector"`` (0-/1-D: biases,
norm weights). ``roles={"name": role}`` overrides the rule for named parameters.

``create_optimizer(model, name, ...)`` gives each role the options its optimizer class declares in
``ROLE_OPTIONS`` (Muon and ROOT: AdamW for all but hidden matrices; Scion: one norm per role;
element-wise optimizers: no weight decay on vectors), then ``role_options`` on top.
"""

from __future__ import annotations

import torch
from torch import nn

ROLES = ("hidden", "embedding", "output", "vector")


def param_roles(model: nn.Module, roles: dict | None = None) -> dict[str, str]:
    """{parameter name: role} for every trainable parameter of ``model`` (tied ones once)."""
    embedding_modules = [m for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
    embeddings = {id(m.weight) for m in embedding_modules}
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if head is None and embedding_modules:  # the last Linear onto the largest vocabulary
        vocab = max(m.num_embeddings for m in embedding_modules)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == vocab]
        head = linears[-1] if linears else None
    outputs = {id(head.weight)} if head is not None else set()
    found = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in outputs:
            found[name] = "output"
        elif id(p) in embeddings:
            found[name] = "embedding"
        else:
            found[name] = "hidden" if p.ndim >= 2 else "vector"
    for name, role in (roles or {}).items():
        if name not in found:
            raise ValueError(f"roles names {name!r}, which is not a trainable parameter of the model")
        if role not in ROLES:
            raise ValueError(f"role of {name!r} must be one of {ROLES}, got {role!r}")
        found[name] = role
    return found


def param_groups(model: nn.Module, roles: dict | None = None) -> list[dict]:
    """One param group per role present, ``{"params": [...], "role": role}``, in ROLES order."""
    named = dict(model.named_parameters())
    by_role = {}
    for name, role in param_roles(model, roles).items():
        by_role.setdefault(role, []).append(named[name])
    return [{"params": by_role[role], "role": role} for role in ROLES if role in by_role]


def create_optimizer(model_or_params, name: str, *, roles: dict | None = None, role_options: dict | None = None,
                     **kwargs) -> torch.optim.Optimizer:
    """fastopt's optimizer ``name`` (a key of ``fastopt.OPTIMIZERS``) for a model, split by role, or for
    given params / param groups as they are. Adam-mini takes the model's named parameters (it has its
    own block rules)."""
    from .. import OPTIMIZERS

    if isinstance(model_or_params, str):
        raise TypeError("create_optimizer takes (model_or_params, name, ...): the model or params come first")
    try:
        cls = OPTIMIZERS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown optimizer {name!r}; fastopt has {sorted(OPTIMIZERS)}") from None
    if not isinstance(model_or_params, nn.Module):
        if roles is not None or role_options is not None:
            raise ValueError("roles and role_options need a model (nn.Module), not a list of parameters")
        return cls(model_or_params, **kwargs)
    model = model_or_params
    if getattr(cls, "TAKES_NAMED_PARAMETERS", False):
        if roles is not None or role_options is not None:
            raise ValueError(f"{cls.__name__} classifies parameters by name: roles and role_options do not apply")
        return cls(model.named_parameters(), **kwargs)
    unknown = set(role_options or {}) - set(ROLES)
    if unknown:
        raise ValueError(f"role_options has unknown roles {sorted(unknown)}; roles are {ROLES}")
    groups = param_groups(model, roles)
    for group in groups:
        group.update(cls.ROLE_OPTIONS.get(group["role"], {}))
        group.update((role_options or {}).get(group["role"], {}))
    return cls(groups, **kwargs)
