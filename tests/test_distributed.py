"""fastopt under torch.distributed on the CPU (gloo, two processes): FSDP2-sharded parameters (DTensors) stepped on
their local shards, bitwise the unsharded step; DDP; the clear errors for what cannot step a shard."""

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


def _model() -> torch.nn.Module:
    torch.manual_seed(0)  # 7 outputs: a shard of 4 rows and one of 3; the first weight's 5120 elements take bf16 state
    return torch.nn.Sequential(torch.nn.Linear(128, 40), torch.nn.GELU(), torch.nn.Linear(40, 7))


def _train(model, opt, steps: int) -> None:
    for step in range(steps):
        torch.manual_seed(100 + step)  # the same batch on every rank: the averaged grad is the one-process grad
        model(torch.randn(5, 128)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _full(model) -> list:
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]


def _fsdp_matches_one_process(make_opt) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    plain = _model()
    sharded = copy.deepcopy(plain)
    fully_shard(sharded, mesh=init_device_mesh("cpu", (WORLD,)))
    _train(plain, make_opt(plain.parameters()), 3)
    opt = make_opt(sharded.parameters())
    _train(sharded, opt, 3)
    for a, b in zip(_full(sharded), _full(plain)):
        assert torch.equal(a, b), (type(opt).__name__, tuple(a.shape), (a - b).abs().max())
    state = opt.state[next(sharded.parameters())]
    moments = [v for k, v in state.items() if k.startswith(("exp_avg", "momentum_buffer"))]
    assert moments and all(type(m).__name__ == "DTensor" for m in moments)


def _worker(rank: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        backend = "cpu"
        for make_opt in (lambda ps: fastopt.AdamW(ps, lr=1e-2, backend=backend),
                         lambda ps: fastopt.AdamW(ps, lr=1e-2, amsgrad=True, backend=backend, state_dtype="bf16"),
                         lambda ps: fastopt.NAdamW(ps, lr=1e-2, backend=backend),
                         lambda ps: fastopt.Lion(ps, lr=1e-3, weight_decay=0.1, backend=backend)):
            _fsdp_matches_one_process(make_opt)
        # Newton-Schulz and Scion's norms on whole matrices gathered from the shards; vectors on AdamW / bias_rms
        for make_opt in (lambda ps: fastopt.Muon(ps, lr=1e-2, backend=backend),
                         lambda ps: fastopt.ROOT(ps, lr=1e-2, backend=backend),
                         lambda ps: fastopt.Scion(ps, lr=1e-2, backend=backend)):
            _fsdp_matches_one_process(make_opt)

        # a distributed checkpoint (torch.distributed.checkpoint) of sharded bf16 state resumes bitwise
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                             set_model_state_dict, set_optimizer_state_dict)

        mesh = init_device_mesh("cpu", (WORLD,))
        models, opts = [], []
        for _ in range(2):
            models.append(_model())
            fully_shard(models[-1], mesh=mesh)
            opts.append(fastopt.AdamW(models[-1].parameters(), lr=1e-2, backend=backend, state_dtype="bf16"))
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
            _train(model, opt, 1)
        for a, b in zip(_full(models[0]), _full(models[1])):
            assert torch.equal(a, b)

        # what cannot step a shard says so, before any state is allocated
        for make_opt, match in ((lambda ps: fastopt.SOAP(ps), "needs each whole tensor"),
                                (lambda ps: fastopt.Kron(ps), "needs each whole tensor"),
                                (lambda ps: fastopt.AdamW(ps, cautious=True), "cautious"),
                                (lambda ps: fastopt.AdamW(ps, state_dtype="fp8"), "fp8 state")):
            model = torch.nn.Linear(64, 128)
            fully_shard(model, mesh=mesh)
            opt = make_opt([model.weight])
            model(torch.randn(2, 64)).sum().backward()
            with pytest.raises(NotImplementedError, match=match):
                opt.step()
            assert not opt.state

        # DDP: replicated parameters are plain tensors, any optimizer steps them (Muon here)
        plain = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(plain))
        matrices = lambda m: [p for p in m.parameters() if p.ndim == 2]  # noqa: E731
        _train(plain, fastopt.Muon(matrices(plain), lr=1e-2, backend=backend), 2)
        _train(ddp, fastopt.Muon(matrices(ddp), lr=1e-2, backend=backend), 2)
        for a, b in zip(ddp.module.parameters(), plain.parameters()):
            assert torch.equal(a, b)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_fsdp2_and_ddp_on_two_processes(tmp_path):
    if not backends.probe("cpu").available:  # built here, once, before the two processes load it
        pytest.skip(f"cpu backend: {backends.probe('cpu').reason}")
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD)
