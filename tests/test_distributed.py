"""fastopt under torch.distributed on the CPU (gloo, two processes): every optimizer on FSDP2-sharded parameters
(DTensors) ends bitwise equal to the one-process run, whichever way it steps them (fastopt.optim.sharding); a
distributed checkpoint resumes bitwise; DDP."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastopt
from fastopt import backends

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLD = 2
LR = 1e-2

# (name, optimizer for a model): the element-wise rules on local shards, Muon / ROOT / Scion gathering whole
# matrices, every other rule (and fp8 state, cautious rules) on whole tensors
OPTIMIZERS = {
    "adamw": lambda m: fastopt.AdamW(m.parameters(), lr=LR, backend="cpu"),
    "adamw-bf16-amsgrad": lambda m: fastopt.AdamW(m.parameters(), lr=LR, amsgrad=True, backend="cpu",
                                                  state_dtype="bf16"),
    "nadamw": lambda m: fastopt.NAdamW(m.parameters(), lr=LR, backend="cpu"),
    "lion": lambda m: fastopt.Lion(m.parameters(), lr=LR / 10, weight_decay=0.1, backend="cpu"),
    "muon": lambda m: fastopt.Muon(m.parameters(), lr=LR, backend="cpu"),
    "root": lambda m: fastopt.ROOT(m.parameters(), lr=LR, backend="cpu"),
    "scion": lambda m: fastopt.Scion(m.parameters(), lr=LR, backend="cpu"),
    "adamw-fp8": lambda m: fastopt.AdamW(m.parameters(), lr=LR, backend="cpu", state_dtype="fp8"),
    "muon-fp8": lambda m: fastopt.Muon(m.parameters(), lr=LR, backend="cpu", state_dtype="fp8"),
    "cautious-lion": lambda m: fastopt.Lion(m.parameters(), lr=LR / 10, cautious=True, backend="cpu"),
    "mars": lambda m: fastopt.MARS(m.parameters(), lr=LR, backend="cpu"),
    "sophia": lambda m: fastopt.Sophia(m.parameters(), lr=LR, backend="cpu"),
    "sophia-fp8": lambda m: fastopt.Sophia(m.parameters(), lr=LR, backend="cpu", state_dtype="fp8"),
    "soap-bf16": lambda m: fastopt.SOAP(m.parameters(), lr=LR, precondition_frequency=2, backend="cpu",
                                        state_dtype="bf16"),
    "adam-mini": lambda m: fastopt.AdamMini(m.named_parameters(), lr=LR, dim=40, n_heads=4, unmatched="tensor",
                                            backend="cpu"),

    "kron": lambda m: fastopt.Kron(m.parameters(), lr=LR, backend="cpu"),
}


def _model() -> torch.nn.Module:
    # 7 outputs: a shard of 4 rows and one of 3; the first weight's 5120 elements take bf16 / fp8 state; two
    # matrices of one shape (a stack on one process, split between the owners under FSDP2)
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(128, 40), torch.nn.GELU(), torch.nn.Linear(40, 40), torch.nn.GELU(),
                               torch.nn.Linear(40, 40), torch.nn.GELU(), torch.nn.Linear(40, 7))


def _train(model, opt, steps: int, first: int = 0) -> None:
    for step in range(first, first + steps):
        torch.manual_seed(100 + step)  # the same batch on every rank: the averaged grad is the one-process grad
        model(torch.randn(5, 128)).square().mean().backward()
        if isinstance(opt, fastopt.Sophia):
            opt.update_hessian()  # h from grad² (Gauss-Newton-Bartlett) on the sharded moments
        opt.step()
        opt.zero_grad()


def _full(model) -> list:
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]


def _worker(rank: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from fastopt.optim import base

        gathered = []  # the whole-tensor step's gathers: none for the rules that step local shards
        base.whole_tensor = lambda t, gather=base.whole_tensor: gathered.append(t) or gather(t)
        mesh = init_device_mesh("cpu", (WORLD,))
        hsdp = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard"))  # (Replicate, Shard(0))
        runs = [(name, make_opt, mesh) for name, make_opt in OPTIMIZERS.items()]
        for name, make_opt, on in runs + [(name, OPTIMIZERS[name], hsdp) for name in ("muon", "adamw-fp8")]:
            gathered.clear()
            plain = _model()
            sharded = copy.deepcopy(plain)
            fully_shard(sharded, mesh=on)
            opt = make_opt(sharded)
            _train(plain, make_opt(plain), 3)
            _train(sharded, opt, 3)
            for a, b in zip(_full(sharded), _full(plain)):
                assert torch.equal(a, b), (name, tuple(a.shape), (a - b).abs().max())
            moments = [v for k, v in opt.state[sharded[0].weight].items()
                       if k in ("exp_avg", "exp_avg_sq", "momentum_buffer", "max_exp_avg_sq")]
            assert moments and all(type(m).__name__ == "DTensor" for m in moments), name
            local = name in ("adamw", "adamw-bf16-amsgrad", "nadamw", "lion", "muon", "root", "scion")
            assert bool(gathered) != local, name

        # Muon's and Scion's Newton-Schulz is split between the ranks: each orthogonalises some of the 4 matrices
        from fastopt.optim import muon, scion

        for name, module in (("muon", muon), ("scion", scion)):
            orthogonalised, orthogonalise = [], module.orthogonalise
            module.orthogonalise = lambda ds, *args, **kw: orthogonalised.extend(ds) or orthogonalise(ds, *args, **kw)
            sharded = _model()
            fully_shard(sharded, mesh=mesh)
            _train(sharded, OPTIMIZERS[name](sharded), 1)
            module.orthogonalise = orthogonalise
            counts = [None] * WORLD
            dist.all_gather_object(counts, len(orthogonalised))
            assert min(counts) > 0 and sum(counts) == 4, (name, counts)

        # a distributed checkpoint (torch.distributed.checkpoint) of sharded bf16 state resumes bitwise
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                             set_model_state_dict, set_optimizer_state_dict)

        models, opts = [], []
        for _ in range(2):
            models.append(_model())
            fully_shard(models[-1], mesh=mesh)
            opts.append(fastopt.AdamW(models[-1].parameters(), lr=LR, backend="cpu", state_dtype="bf16"))
        _train(models[0], opts[0], 2)
        # this rank's bytes: two moments of each local shard (bf16; fp32 under 4096 elements) and a step counter
        assert opts[0].state_bytes() == sum((4 if p.numel() >= 4096 else 8) * p.to_local().numel() + 4
                                            for p in models[0].parameters())
        dcp.save({"model": get_model_state_dict(models[0]), "optim": get_optimizer_state_dict(models[0], opts[0])},
                 checkpoint_id=f"{tmp}/checkpoint")
        loaded = {"model": get_model_state_dict(models[1]), "optim": get_optimizer_state_dict(models[1], opts[1])}
        dcp.load(loaded, checkpoint_id=f"{tmp}/checkpoint")
        set_model_state_dict(models[1], loaded["model"])
        set_optimizer_state_dict(models[1], opts[1], loaded["optim"])
        for model, opt in zip(models, opts):
            _train(model, opt, 1, first=2)
        for a, b in zip(_full(models[0]), _full(models[1])):
            assert torch.equal(a, b)

        # a grad sharded unlike its parameter is refused
        model = torch.nn.Linear(64, 128)
        fully_shard(model, mesh=mesh)
        opt = fastopt.AdamW(model.parameters())
        model.weight.grad = torch.ones(128, 64)
        with pytest.raises(ValueError, match="sharded like its parameter"):
            opt.step()

        # DDP: replicated parameters are plain tensors, stepped as on one process
        plain = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(plain))
        _train(plain, OPTIMIZERS["muon"](plain), 2)
        _train(ddp, OPTIMIZERS["muon"](ddp.module), 2)
        for a, b in zip(ddp.module.parameters(), plain.parameters()):
            assert torch.equal(a, b)
    finally:
        dist.destroy_process_group()


def test_every_optimizer_on_fsdp2_and_ddp(tmp_path):
    if not backends.probe("cpu").available:  # built here, once, before the two processes load it
        pytest.skip(f"cpu backend: {backends.probe('cpu').reason}")
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD)
