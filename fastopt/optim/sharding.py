"""Sharded (DTensor) parameters, e.g. FSDP2's: the whole tensors a rule needs, and each rank's shard of a result.

Three ways a fastopt optimizer steps a sharded parameter (its moments are DTensors sharded alike):

* an element-wise rule (AdamW, NAdamW, Lion) steps each rank's local shard: nothing here;
* Muon, ROOT and Scion run their element-wise momentum pass on the local shards, then ``whole`` all-gathers each
  matrix's direction and ``whole_norms`` its norm from the shards' (Newton-Schulz must divide by the one-process
  norm: its bf16 iterations amplify a last-bit difference), every rank orthogonalises the whole matrices and
  ``own_shards`` keeps its part of each update (redundant work, one all-gather per matrix: Moonlight's
  distributed Muon does the same);
* any other rule, and fp8 state (its block scales cover the whole tensor), takes FusedOptimizer._update_whole: the
  parameter, its grad and its state made whole (``whole_tensor``), the one-process step on every rank, each rank's
  shards written back (``copy_own_shard_``).

Every way gives the one-process step bit for bit (tests/test_distributed.py).
"""

from __future__ import annotations

import torch


def whole_tensor(t, like=None) -> torch.Tensor:
    """The whole tensor of a DTensor ``t``, all-gathered over its mesh; or of a local shard ``t`` of a tensor sharded
    as the DTensor ``like`` (float8 codes travel as bytes: the collectives may lack float8)."""
    from torch.distributed.tensor import DTensor

    like = t if like is None else like
    local = t.to_local() if t is like else t
    raw = local.view(torch.uint8) if local.dtype == torch.float8_e4m3fn else local
    full = DTensor.from_local(raw, like.device_mesh, like.placements, shape=like.shape, stride=like.stride(),
                              run_check=False).full_tensor()
    return full.view(local.dtype)


def whole(tensors: list, sharded: list) -> list:
    """Each tensor whose entry of ``sharded`` is a DTensor parameter, read as that parameter's local shard, made
    whole; tensors with None pass through."""
    return [t if like is None else whole_tensor(t, like) for t, like in zip(tensors, sharded)]


def whole_norms(norms: list, sharded: list) -> list:
    """The Frobenius norm of each whole tensor from its shard's (a float64 0-d tensor; None where unknown): the
    shards' squares summed over the mesh dimensions that shard the parameter (one all-reduce per parameter)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    out = []
    for norm, like in zip(norms, sharded):
        if like is not None and norm is not None:
            partial = [Partial() if isinstance(p, Shard) else Replicate() for p in like.placements]
            norm = DTensor.from_local(norm.square().reshape(1), like.device_mesh, partial,
                                      run_check=False).full_tensor()[0].sqrt()
        out.append(norm)
    return out


def own_shard(t: torch.Tensor, like) -> torch.Tensor:
    """This rank's shard of the whole tensor ``t``, sliced as the DTensor ``like`` is sharded (no communication)."""
    from torch.distributed.tensor import DTensor, Replicate

    mesh = like.device_mesh
    raw = t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
    shard = DTensor.from_local(raw, mesh, [Replicate()] * mesh.ndim, run_check=False).redistribute(
        mesh, like.placements).to_local()
    return shard.view(t.dtype)


def own_shards(tensors: list, sharded: list) -> list:
    """This rank's shard of each whole tensor whose entry of ``sharded`` is a DTensor parameter, the others as
    they are."""
    return [t if like is None else own_shard(t, like) for t, like in zip(tensors, sharded)]


def copy_own_shard_(target, t: torch.Tensor) -> None:
    """Write this rank's shard of the whole tensor ``t`` into the DTensor ``target``'s local shard."""
    target.to_local().copy_(own_shard(t, target))
