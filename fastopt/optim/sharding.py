"""Sharded (DTensor) parameters, e.g. FSDP2's: the whole tensors a rule needs, and each rank's shard of a result.

An element-wise rule (AdamW, NAdamW, Lion) steps each rank's local shard and needs nothing here. A rule with a
function of the whole matrix (Newton-Schulz, a column norm: Muon, ROOT, Scion) runs its element-wise momentum pass on
the local shards, then ``whole`` all-gathers each sharded parameter's direction and ``whole_norms`` its norm from the
shards' (so Newton-Schulz sees the one-process norm: its bf16 iterations amplify a last-bit difference), every rank
computes the function on the whole matrices (the same result on each: redundant work, no second collective;
Moonlight's distributed Muon does the same), and ``own_shards`` keeps the rank's part of each update, sliced as the
parameter is sharded. The result is bitwise the one-process step (tests/test_distributed.py).
"""

from __future__ import annotations


def whole(tensors: list, sharded: list) -> list:
    """Each tensor whose entry of ``sharded`` is a DTensor parameter, read as that parameter's local shard, made
    whole (all-gathered over the parameter's mesh); tensors with None pass through."""
    from torch.distributed.tensor import DTensor

    return [t if like is None else
            DTensor.from_local(t, like.device_mesh, like.placements, shape=like.shape, stride=like.stride(),
                               run_check=False).full_tensor()
            for t, like in zip(tensors, sharded)]


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


def own_shards(tensors: list, sharded: list) -> list:
    """This rank's shard of each whole tensor whose entry of ``sharded`` is a DTensor parameter (as that parameter's
    placements slice it: no communication), the others as they are."""
    from torch.distributed.tensor import DTensor, Replicate

    shards = []
    for t, like in zip(tensors, sharded):
        if like is not None:
            mesh = like.device_mesh
            t = DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False).redistribute(
                mesh, like.placements).to_local()
        shards.append(t)
    return shards
