"""Sharded (DTensor) parameters, e.g. FSDP2's: the whole tensors a rule needs, and each rank's shard of a result.

Three ways a fastopt optimizer steps a sharded parameter (its moments are DTensors sharded alike):

* an element-wise rule (AdamW, NAdamW, Lion) steps each rank's local shard: nothing here;
* Muon, ROOT and Scion run their element-wise momentum pass on the local shards, then ``per_owner``: each matrix's
  direction is gathered whole on one owner rank (owners taken in turn by size), its norm summed from the shards'
  (``whole_norms``: Newton-Schulz must divide by the one-process norm, its bf16 iterations amplify a last-bit
  difference), each owner orthogonalises its matrices in one batch per shape, and every rank gets its shard of
  each update back: one gather and one scatter per matrix, the Newton-Schulz work split across the ranks (as
  DESIGN.md's all-to-all). Scion's other LMOs (sign, column / row / bias norms) all-gather their tensors
  (``whole``), run on every rank and keep their slice (``own_shards``);
* any other rule, and fp8 state (its block scales cover the whole tensor), takes FusedOptimizer._update_whole: the
  parameter, its grad and its state made whole (``whole_tensor``), the one-process step on every rank, each rank's
  shards written back (``copy_own_shard_``); the state that is not a DTensor (factors, fp8 scales) stays whole
  and the same on every rank, so a distributed checkpoint holds one copy.

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


def per_owner(fn, tensors: list, norms: list, sharded: list, out_dtype: torch.dtype) -> list:
    """fn(whole tensors, their norms) → a result per tensor in its shape, for tensors whose entry of ``sharded`` is
    None (a whole tensor: fn runs here) or a DTensor parameter (the tensor is its local shard; the result comes back
    as this rank's shard, in ``out_dtype``). Parameters sharded along dimension 0 over one mesh dimension (FSDP2;
    Replicate on any other) are each gathered whole on one owner rank of that dimension's group, owners taken in
    turn by size, each owner runs fn once on the tensors it owns, and the results are scattered back: fn's work
    is split across the ranks. Other shardings take the all-gather way (every rank runs fn on them)."""
    results, owned, here = [None] * len(tensors), {}, []
    norms = whole_norms(norms, sharded)
    for i, like in enumerate(sharded):
        group = None if like is None else _shard_group(like)
        if group is None:
            here.append(i)
        else:
            owned.setdefault(group, []).append(i)
    for group, members in owned.items():
        world, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
        load, owner, mine = [0] * world, {}, {}
        for i in sorted(members, key=lambda i: -sharded[i].numel()):  # the same order on every rank
            owner[i] = min(range(world), key=load.__getitem__)
            load[owner[i]] += sharded[i].numel()
        # every transfer of a group in flight at once: each call starts one and returns what waits for it
        gathers = [(i, _gather_rows(tensors[i], sharded[i], owner[i], group)) for i in members]
        for i, finish in gathers:
            gathered = finish()
            if owner[i] == rank:
                mine[i] = gathered
        outputs = dict(zip(mine, fn(list(mine.values()), [norms[i] for i in mine]))) if mine else {}
        scatters = [(i, _scatter_rows(outputs.get(i), sharded[i], owner[i], group, out_dtype)) for i in members]
        for i, finish in scatters:
            results[i] = finish()
    wholes = [tensors[i] if sharded[i] is None else whole_tensor(tensors[i], sharded[i]) for i in here]
    for i, out in zip(here, fn(wholes, [norms[i] for i in here]) if here else []):
        results[i] = out if sharded[i] is None else own_shard(out, sharded[i])
    return results


def _shard_group(like):
    """The process group of the one mesh dimension that shards ``like`` along dimension 0 (any other placement
    Replicate), or None for another sharding."""
    from torch.distributed.tensor import Replicate, Shard

    placements = like.placements
    sharding = [k for k, p in enumerate(placements) if isinstance(p, Shard)]
    if len(sharding) != 1 or placements[sharding[0]].dim != 0 or \
            not all(isinstance(p, Replicate) for k, p in enumerate(placements) if k != sharding[0]):
        return None
    return like.device_mesh.get_group(sharding[0])


def _row_counts(rows: int, world: int) -> list:
    """The rows of each rank's shard of ``rows`` rows sharded along dimension 0 (torch.chunk's split)."""
    size = -(-rows // world)
    return [max(0, min(rows, (r + 1) * size) - r * size) for r in range(world)]


def _gather_rows(local: torch.Tensor, like, owner: int, group):
    """Starts gathering the whole tensor on ``owner`` from every rank's shard along dimension 0; returns what waits
    for it and gives the whole tensor (None except on the owner)."""
    import torch.distributed as dist

    counts = _row_counts(like.shape[0], dist.get_world_size(group))
    if local.shape[0] != counts[dist.get_rank(group)]:
        raise RuntimeError(f"a shard of {local.shape[0]} rows of a {tuple(like.shape)} tensor on rank "
                           f"{dist.get_rank(group)}: expected torch.chunk's split, {counts}")
    padded = local.new_zeros((counts[0], *local.shape[1:]))
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in counts] if dist.get_rank(group) == owner else None
    work = dist.gather(padded, parts, dst=dist.get_global_rank(group, owner), group=group, async_op=True)

    def finish():
        work.wait()
        return None if parts is None else torch.cat([part[:n] for part, n in zip(parts, counts)])
    return finish


def _scatter_rows(result, like, owner: int, group, dtype: torch.dtype):
    """Starts scattering the owner's whole ``result`` (None except on the owner); returns what waits for it and
    gives this rank's rows, in ``dtype``."""
    import torch.distributed as dist

    counts = _row_counts(like.shape[0], dist.get_world_size(group))
    received = torch.empty((counts[0], *like.shape[1:]), dtype=dtype, device=like.device)
    parts = None
    if result is not None:
        parts = [received.new_zeros(received.shape) for _ in counts]
        for part, rows in zip(parts, result.reshape(like.shape).split(counts)):
            part[:rows.shape[0]] = rows
    work = dist.scatter(received, parts, src=dist.get_global_rank(group, owner), group=group, async_op=True)

    def finish():
        work.wait()
        return received[:counts[dist.get_rank(group)]]
    return finish


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
