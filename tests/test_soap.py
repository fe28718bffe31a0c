"""The SOAP reference (fastopt.reference.soap) against pytorch-optimizer's port of the official code and the
paper's invariants."""

import math

import pytest
import torch

from fastopt.reference.soap import WorkBuffers, merged_shape, project, soap_step

STEPS = 23  # two eigenbasis refreshes at the default frequency 10


def tensors(shape, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=gen, dtype=torch.float64)
    return p, [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(steps)]


def run_reference(p, grads, **kwargs):
    p, state = p.clone(), {}
    for step, g in enumerate(grads, 1):
        soap_step(p, g, state, step, lr=3e-3, **kwargs)
    return p, state


# Full-rank factors only (a rectangular matrix's larger factor, or a vector's outer products over fewer steps
# than its length, is rank-deficient: its null-space basis is arbitrary and two correct implementations
# differ): square matrices, a short vector with and without its own preconditioner, and a 3-D tensor whose
# first dimension is above max_precond_dim (unrotated).
@pytest.mark.parametrize("shape,kwargs", [
    ((12, 12), {}),
    ((12, 12), dict(correct_bias=False, weight_decay=0.0, betas=(0.9, 0.99), shampoo_beta=0.8)),
    ((12, 12), dict(precondition_frequency=3, normalize_grads=True)),
    ((30,), {}),
    ((8,), dict(precondition_1d=True)),
    ((9, 5, 5), dict(max_precond_dim=6)),
])
def test_matches_pytorch_optimizer_soap(shape, kwargs):
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    p0, grads = tensors(shape, STEPS)
    ours, state = run_reference(p0, grads, **kwargs)
    port_kwargs = {("max_precondition_dim" if k == "max_precond_dim" else
                    "normalize_gradient" if k == "normalize_grads" else k): v for k, v in kwargs.items()}
    theirs = torch.nn.Parameter(p0.clone())
    opt = pytorch_optimizer.SOAP([theirs], lr=3e-3, **port_kwargs)
    for g in grads:
        theirs.grad = g.clone()
        opt.step()
    # the port (like the official code) runs the refresh's QR in float32: agreement to ~1e-7 relative after it;
    # its normalize_gradient adds eps (1e-8) to the RMS where the official code adds 1e-30
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-7)


def test_the_step_leaves_the_gradient_as_it_was():
    """The step reuses the projected gradient's buffer; unrotated (a view of the gradient), it is copied first."""
    for shape, kwargs in (((30,), {}), ((9, 5, 5), dict(max_precond_dim=4)), ((12, 12), {})):
        p0, grads = tensors(shape, 3)
        kept = [g.clone() for g in grads]
        run_reference(p0, grads, **kwargs)
        assert all(torch.equal(g, k) for g, k in zip(grads, kept)), shape


def test_first_step_only_builds_the_bases_and_they_are_orthonormal():
    p0, grads = tensors((6, 10), 2)
    p, state = p0.clone(), {}
    soap_step(p, grads[0], state, 1, lr=1.0)
    assert torch.equal(p, p0) and not state["exp_avg"].any()
    left, right = state["GG"]
    torch.testing.assert_close(left, 0.05 * grads[0] @ grads[0].T)
    torch.testing.assert_close(right, 0.05 * grads[0].T @ grads[0])
    for q, factor in zip(state["Q"], state["GG"]):
        torch.testing.assert_close(q.T @ q, torch.eye(q.shape[0], dtype=q.dtype), atol=1e-12, rtol=0)
        eigenvalues = (q * (factor @ q)).sum(0)  # diag(Qᵀ F Q): descending
        assert torch.all(eigenvalues[:-1] >= eigenvalues[1:] - 1e-12)
    # project_back undoes project (rectangular, both factors)
    x = torch.randn(6, 10, dtype=torch.float64)
    torch.testing.assert_close(project(project(x, state["Q"]), state["Q"], back=True), x)
    torch.testing.assert_close(project(x, state["Q"]), state["Q"][0].T @ x @ state["Q"][1])


def test_refresh_sorts_and_permutes_the_second_moment():
    """A refresh on a hand-made state: bases = identity, factors diagonal with increasing entries. The power
    iteration F·Q keeps the directions, the estimated eigenvalues ask for the reverse order, so the new bases
    are the reversed identity (up to signs) and v's rows and columns are reversed with them."""
    from fastopt.reference.soap import _refresh_bases

    left, right = torch.diag(torch.arange(1.0, 4.0, dtype=torch.float64)), torch.diag(
        torch.arange(1.0, 5.0, dtype=torch.float64))
    v = torch.arange(12.0, dtype=torch.float64).reshape(3, 4)
    # a batch of two: the hand-made state, and the same with the first factor's order already descending
    state = {"GG": [torch.stack([left, left.flip(0, 1)]), torch.stack([right, right])],
             "Q": [torch.eye(n, dtype=torch.float64).expand(2, n, n) for n in (3, 4)],
             "exp_avg_sq": torch.stack([v, v])}
    _refresh_bases(state)
    assert torch.equal(state["exp_avg_sq"][0], v.flip(0).flip(1)) and torch.equal(state["exp_avg_sq"][1], v.flip(1))
    for q, n in zip(state["Q"], (3, 4)):
        torch.testing.assert_close(q[0].abs(), torch.eye(n, dtype=torch.float64).flip(1))
    torch.testing.assert_close(state["Q"][0][1].abs(), torch.eye(3, dtype=torch.float64))


def test_optimizer_runs_the_reference_and_its_factor_kernel():
    """fastopt.SOAP on the torch backend is the reference; on the cpu backend the matrix factors run on
    kron_factor_update (fp32, close to the fp64 reference); a dimension above max_precond_dim has no factor."""
    import fastopt

    shapes = [(12, 12), (30,), (9, 5, 5), (40, 6)]
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(12)]
    expected = []
    for p0, gs in zip(start, zip(*grads)):
        expected.append(run_reference(p0, list(gs), precondition_frequency=5, max_precond_dim=20)[0])
    for backend, dtype, tolerance in (("torch", torch.float64, 1e-12), ("cpu", torch.float32, 1e-4)):
        ps = [torch.nn.Parameter(p0.to(dtype, copy=True)) for p0 in start]
        opt = fastopt.SOAP(ps, precondition_frequency=5, max_precond_dim=20, backend=backend)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.to(dtype)
            opt.step()
        for p, p0, e in zip(ps, start, expected):
            assert ((p.detach().double() - e).norm() / (e - p0).norm()).item() < tolerance
        assert opt.state[ps[3]]["GG"][0] is None and opt.state[ps[3]]["GG"][1].shape == (6, 6)


def test_optimizer_checkpoint_round_trip_and_refusals():
    import fastopt

    gen = torch.Generator().manual_seed(1)
    ps = [torch.nn.Parameter(torch.randn(8, 8, generator=gen)) for _ in range(2)]
    copy = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    grads = [[torch.randn(8, 8, generator=gen) for _ in ps] for _ in range(8)]
    opt = fastopt.SOAP(ps, precondition_frequency=3, backend="cpu")
    for gs in grads[:5]:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
    for p, c in zip(ps, copy):
        c.data.copy_(p.detach())
    resumed = fastopt.SOAP(copy, precondition_frequency=3, backend="cpu")
    resumed.load_state_dict(opt.state_dict())
    for gs in grads[5:]:  # across a refresh
        for o, group in ((opt, ps), (resumed, copy)):
            for p, g in zip(group, gs):
                p.grad = g.clone()
            o.step()
    for p, c in zip(ps, copy):
        assert torch.equal(p, c)
    with pytest.raises(ValueError, match="state_dtype"):
        fastopt.SOAP(ps, state_dtype="fp16")
    with pytest.raises(ValueError, match="precondition_frequency"):
        fastopt.SOAP(ps, precondition_frequency=0)


def test_state_bytes_count_the_factors_and_bases():
    import fastopt

    p = torch.nn.Parameter(torch.randn(24, 96))
    p.grad = torch.randn(24, 96)
    opt = fastopt.SOAP([p], backend="cpu")
    opt.step()
    moments, factors = 2 * 24 * 96 * 4, 2 * (24 * 24 + 96 * 96) * 4  # m, v; L, R and Q_L, Q_R, fp32
    assert opt.state_bytes() == moments + factors + 4  # + the step counter


def test_merged_shape_follows_the_official_rule():
    assert merged_shape((64, 3, 3, 3), 100) == (64, 27)
    assert merged_shape((2, 3, 6), 6) == (6, 6)
    assert merged_shape((20000, 3), 10000) == (20000, 3)  # a dimension above the limit stands alone
    assert merged_shape((3, 20000, 2, 2), 10000) == (3, 20000, 4)
    assert merged_shape((2, 3, 4), 100) == (24,)
    assert merged_shape((1, 1), 10) == (1,)


def test_merge_dims_is_the_step_on_the_merged_view():
    """A 4-D tensor with merge_dims runs exactly the step of its merged (30, 27) reshape, moments in its own shape;
    against pytorch-optimizer's port where the merged factors are square and full rank."""
    import fastopt

    p0, grads = tensors((30, 3, 3, 3), STEPS)
    merged, state = run_reference(p0, grads, merge_dims=True, max_precond_dim=30)
    flat, _ = run_reference(p0.reshape(30, 27), [g.reshape(30, 27) for g in grads], max_precond_dim=30)
    assert torch.equal(merged, flat.reshape(p0.shape))
    assert state["exp_avg_sq"].shape == p0.shape and [tuple(f.shape) for f in state["GG"]] == [(30, 30), (27, 27)]
    param = torch.nn.Parameter(p0.float())
    opt = fastopt.SOAP([param], merge_dims=True, max_precond_dim=30, backend="cpu")
    for g in grads[:3]:
        param.grad = g.float()
        opt.step()
    assert [tuple(f.shape) for f in opt.state[param]["GG"]] == [(30, 30), (27, 27)]
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    p0, grads = tensors((2, 3, 6), STEPS, seed=3)
    ours, _ = run_reference(p0, grads, merge_dims=True, max_precond_dim=6)
    theirs = torch.nn.Parameter(p0.clone())
    opt = pytorch_optimizer.SOAP([theirs], lr=3e-3, merge_dims=True, max_precondition_dim=6)
    for g in grads:
        theirs.grad = g.clone()
        opt.step()
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("state_dtype,tolerance", [("bf16", 1e-2), ("fp8", 5e-2)])
def test_low_precision_moments(state_dtype, tolerance):
    """bf16 / fp8 moments (a 96x64 weight: stored so; a 32-vector: fp32 under 4096 elements) stay close to the fp32
    run across two refreshes, and the state holds the stored dtypes."""
    import fastopt

    gen = torch.Generator().manual_seed(2)
    start = [torch.randn(96, 64, generator=gen), torch.randn(32, generator=gen)]
    grads = [[torch.randn(p.shape, generator=gen) for p in start] for _ in range(STEPS)]
    results = {}
    for dtype in ("fp32", state_dtype):
        ps = [torch.nn.Parameter(p.clone()) for p in start]
        opt = fastopt.SOAP(ps, backend="cpu", state_dtype=dtype)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        results[dtype] = ps[0].detach()
    stored = opt.state[ps[0]]
    assert stored["exp_avg_projected"].dtype == stored["exp_avg_sq"].dtype == {
        "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[state_dtype]
    assert opt.state[ps[1]]["exp_avg_projected"].dtype == torch.float32  # under 4096 elements
    change = (results[state_dtype] - results["fp32"]).norm() / (results["fp32"] - start[0]).norm()
    assert change < tolerance


def test_grad_scaler_unscales_and_skips_inf_steps():
    import fastopt

    gen = torch.Generator().manual_seed(4)
    start, x = torch.randn(8, 8, generator=gen), torch.randn(16, 8, generator=gen)
    runs = []
    for scaled in (False, True):
        p = torch.nn.Parameter(start.clone())
        opt = fastopt.SOAP([p], precondition_frequency=2, backend="cpu")
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=scaled)
        for step in range(6):
            opt.zero_grad()
            scaler.scale((x @ p).square().mean()).backward()
            if step == 3:
                p.grad[0, 0] = float("inf") if scaled else p.grad[0, 0]
            if scaled or step != 3:  # the unscaled run leaves out the step the scaler skips
                scaler.step(opt)
                scaler.update()
        runs.append((p.detach(), float(opt.state[p]["step"])))
    (plain, plain_steps), (scaled, scaled_steps) = runs
    assert plain_steps == scaled_steps == 5
    torch.testing.assert_close(scaled, plain, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape,kwargs", [((12, 12), {}), ((9, 5, 5), dict(max_precond_dim=6)),
                                          ((4, 3, 3, 3), dict(merge_dims=True, max_precond_dim=12)),
                                          ((8,), dict(precondition_1d=True, precondition_frequency=3))])
def test_projected_momentum_gives_the_official_update(shape, kwargs):
    """The first moment kept as project(m) (fastopt.SOAP's layout) against m kept in the original space (the
    official one), in float64 across refreshes; the two states hold the same moment."""
    p0, grads = tensors(shape, STEPS)
    official, state = run_reference(p0, grads, **kwargs)
    projected, projected_state = run_reference(p0, grads, projected_momentum=True, **kwargs)
    torch.testing.assert_close(projected, official, rtol=1e-12, atol=1e-14)
    assert "exp_avg" not in projected_state and projected_state["exp_avg_projected"].shape == shape
    merged = projected_state["exp_avg_projected"].reshape([len(q) if q is not None else -1 for q in state["Q"]]
                                                          if kwargs.get("merge_dims") else shape)
    back = project(merged, state["Q"], back=True).reshape(shape)
    torch.testing.assert_close(back, state["exp_avg"], rtol=1e-10, atol=1e-14)


def test_work_buffers_give_the_step_of_fresh_tensors():
    """One WorkBuffers serving the steps of tensors of several shapes in turn (1 to 3 rotations, a partition, an
    unrotated vector) gives bitwise the step of fresh tensors, and once grown allocates nothing."""
    cases = [((12, 20), {}), ((9, 5, 5), dict(max_precond_dim=6)), ((3, 4, 5), {}), ((30,), {}),
             ((10, 7), dict(partition_block_size=4)), ((6, 6), dict(normalize_grads=True))]
    runs = [tensors(shape, 13, seed=i) + (kwargs,) for i, (shape, kwargs) in enumerate(cases)]
    fresh = [p.clone() for p, _, _ in runs]
    fresh_states, shared_states = [{} for _ in runs], [{} for _ in runs]
    shared, buffers, storages = [p.clone() for p, _, _ in runs], WorkBuffers(), []
    for step in range(1, 14):
        for p, q, (_, grads, kwargs), fresh_state, shared_state in zip(fresh, shared, runs, fresh_states,
                                                                         shared_states):
            options = dict(lr=3e-3, precondition_frequency=5, projected_momentum=True, **kwargs)
            soap_step(p, grads[step - 1], fresh_state, step, **options)
            soap_step(q, grads[step - 1], shared_state, step, buffers=buffers, **options)
        storages.append(sorted(b.untyped_storage().data_ptr() for pair in buffers._pairs.values() for b in pair))
    for p, q in zip(fresh, shared):
        assert torch.equal(p, q)
    assert len(storages[-1]) == 2 and storages[-1] == storages[1]


def test_an_official_layout_checkpoint_loads_projected():
    """A state in the official layout (exp_avg in the original space) loads into fastopt.SOAP, its moment
    projected into the saved bases, and training continues as the official step would."""
    import fastopt

    p0, grads = tensors((10, 10), 16)
    official, state = run_reference(p0, grads[:7], precondition_frequency=4)
    param = torch.nn.Parameter(official.clone())
    opt = fastopt.SOAP([param], precondition_frequency=4, backend="torch")
    saved = opt.state_dict()
    saved["state"] = {0: {"step": torch.tensor(7.0, dtype=torch.float64), **state}}
    opt.load_state_dict(saved)
    for step, g in enumerate(grads[7:], 8):
        soap_step(official, g, state, step, lr=3e-3, precondition_frequency=4)
        param.grad = g.clone()
        opt.step()
    torch.testing.assert_close(param.detach(), official, rtol=1e-10, atol=1e-12)


# ---- partition_block_size: blocks of the tensor as SOAP tensors of their own -----------------------------------

@pytest.mark.parametrize("shape,block", [((20, 14), 8), ((20, 6), 8), ((9, 5, 5), 4)])
def test_partitioned_step_is_each_blocks_own_step(shape, block):
    """Every block of the chunk grid (last chunks shorter) takes the step an unpartitioned SOAP takes on it alone,
    across refreshes; its moments live in its region of the tensor's."""
    import itertools

    from fastopt.reference.soap import partition

    kwargs = dict(precondition_frequency=3, max_precond_dim=20)
    p0, grads = tensors(shape, 10, seed=3)
    ours, state = run_reference(p0, grads, partition_block_size=block, **kwargs)
    classes = partition(shape, [n <= 20 for n in shape], block)
    assert len(state["blocks"]) == len(classes) > 1 and "GG" not in state
    blocks = 0
    for (starts, sizes, counts), saved in zip(classes, state["blocks"]):
        for i, index in enumerate(itertools.product(*map(range, counts))):  # the class's batch order
            region = tuple(slice(s + j * n, s + (j + 1) * n) for s, n, j in zip(starts, sizes, index))
            alone, alone_state = run_reference(p0[region].contiguous(), [g[region].contiguous() for g in grads],
                                               **kwargs)
            torch.testing.assert_close(ours[region], alone, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(state["exp_avg_sq"][region], alone_state["exp_avg_sq"], rtol=1e-12,
                                       atol=1e-14)
            for ours_q, alone_q in zip(saved["Q"], alone_state["Q"]):
                assert (ours_q is None) == (alone_q is None)
                assert ours_q is None or torch.allclose(ours_q[i], alone_q, rtol=1e-10, atol=1e-12)
            blocks += 1
        assert all(q is None or max(q.shape[1:]) <= block for q in saved["Q"])
    assert blocks == math.prod(-(-n // block) if n <= 20 else 1 for n in shape)


def test_a_tensor_within_the_block_size_is_one_block():
    p0, grads = tensors((6, 6), 8)
    whole, _ = run_reference(p0, grads, precondition_frequency=3)
    blocked, state = run_reference(p0, grads, precondition_frequency=3, partition_block_size=8)
    assert len(state["blocks"]) == 1
    torch.testing.assert_close(blocked, whole, rtol=1e-12, atol=1e-14)


def test_optimizer_partitioned_state_bytes_checkpoint_and_refusals():
    """fastopt.SOAP(partition_block_size=b): the reference's partitioned step on the torch and cpu backends; factors
    of at most b×b (state_bytes counts them); a checkpoint resumes bitwise; a checkpoint of the other layout is
    refused."""
    import fastopt

    gen = torch.Generator().manual_seed(2)
    # square blocks: a rectangular block's larger factor starts rank-deficient (fp32 and fp64 bases then differ)
    p0 = torch.randn(16, 24, generator=gen, dtype=torch.float64)
    grads = [torch.randn(16, 24, generator=gen, dtype=torch.float64) for _ in range(9)]
    expected, _ = run_reference(p0, grads, precondition_frequency=3, partition_block_size=8)
    for backend, dtype, tolerance in (("torch", torch.float64, 1e-12), ("cpu", torch.float32, 1e-4)):
        p = torch.nn.Parameter(p0.to(dtype, copy=True))
        opt = fastopt.SOAP([p], precondition_frequency=3, partition_block_size=8, backend=backend)
        for g in grads:
            p.grad = g.to(dtype)
            opt.step()
        assert ((p.detach().double() - expected).norm() / (expected - p0).norm()).item() < tolerance
    odd = torch.nn.Parameter(torch.randn(20, 14))
    odd.grad = torch.randn(20, 14)
    counted = fastopt.SOAP([odd], partition_block_size=8, backend="cpu")
    counted.step()
    # rows in chunks 8, 8, 4 and columns 8, 6: every block's L and R, and their bases, fp32
    factors = 2 * 4 * sum(r * r + c * c for r in (8, 8, 4) for c in (8, 6))
    assert counted.state_bytes() == 2 * 20 * 14 * 4 + factors + 4

    copy = torch.nn.Parameter(p.detach().clone())
    resumed = fastopt.SOAP([copy], precondition_frequency=3, partition_block_size=8, backend="cpu")
    resumed.load_state_dict(opt.state_dict())
    for g in grads[:4]:  # across a refresh
        for o, q in ((opt, p), (resumed, copy)):
            q.grad = g.float()
            o.step()
    assert torch.equal(p, copy)
    # the group's setting travels with the checkpoint (as torch.optim's hyperparameters do); a state that
    # contradicts it is refused
    saved = opt.state_dict()
    saved["param_groups"][0]["partition_block_size"] = None
    with pytest.raises(ValueError, match="with partition blocks for an optimizer with partition_block_size=None"):
        fastopt.SOAP([torch.nn.Parameter(p.detach().clone())], backend="cpu").load_state_dict(saved)
    with pytest.raises(ValueError, match="partition_block_size"):
        fastopt.SOAP([p], partition_block_size=0)
    for size in (4, None):  # changed mid-run: refused, not silently restarted in another layout
        opt.param_groups[0]["partition_block_size"] = size
        with pytest.raises(ValueError, match="cannot change mid-run"):
            opt.step()


def test_partitioned_low_precision_moments():
    """bf16 moments with partition blocks: the step decodes and re-encodes the whole tensor's moments."""
    import fastopt

    gen = torch.Generator().manual_seed(4)
    p0 = torch.randn(40, 24, generator=gen)
    grads = [torch.randn(40, 24, generator=gen) for _ in range(8)]
    runs = {}
    for state_dtype in ("fp32", "bf16"):
        p = torch.nn.Parameter(p0.clone())
        opt = fastopt.SOAP([p], precondition_frequency=3, partition_block_size=16, backend="cpu",
                           state_dtype=state_dtype)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        runs[state_dtype] = p.detach() - p0
    assert ((runs["bf16"] - runs["fp32"]).norm() / runs["fp32"].norm()).item() < 0.01


def test_eigh_failures_fall_back_to_float64_and_are_counted(monkeypatch):
    """A float32 eigh that fails is redone in float64 (the same bases as a float64 eigh gives), warned, and counted
    per factor, whole tensors and blocks alike, through a checkpoint."""
    import fastopt

    real_eigh = torch.linalg.eigh

    def failing_in_float32(a, *args, **kwargs):
        if a.dtype == torch.float32:
            raise RuntimeError("linalg.eigh: the algorithm failed to converge (simulated)")
        return real_eigh(a, *args, **kwargs)

    gen = torch.Generator().manual_seed(5)
    p0, grads = torch.randn(16, 16, generator=gen), [torch.randn(16, 16, generator=gen) for _ in range(3)]
    healthy = torch.nn.Parameter(p0.clone())
    reference = fastopt.SOAP([healthy], backend="torch")
    for g in grads:
        healthy.grad = g.clone()
        reference.step()
    assert reference.eigh_fallbacks() == 0
    monkeypatch.setattr(torch.linalg, "eigh", failing_in_float32)
    whole, blocked = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(torch.randn(16, 24, generator=gen))
    opt = fastopt.SOAP([whole], backend="torch")
    opt.add_param_group(dict(params=[blocked], partition_block_size=8))
    with pytest.warns(RuntimeWarning, match="retrying in float64"):
        for g in grads:
            whole.grad, blocked.grad = g.clone(), torch.randn(16, 24, generator=gen)
            opt.step()
    assert opt.state[whole]["eigh_fallbacks"] == 2 and opt.state[blocked]["eigh_fallbacks"] == 2 * 6
    assert opt.eigh_fallbacks() == 14
    torch.testing.assert_close(whole, healthy, rtol=1e-4, atol=1e-6)
    resumed = fastopt.SOAP([torch.nn.Parameter(whole.detach().clone())], backend="torch")
    resumed.add_param_group(dict(params=[torch.nn.Parameter(blocked.detach().clone())], partition_block_size=8))
    resumed.load_state_dict(opt.state_dict())
    assert resumed.eigh_fallbacks() == 14


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shape,partition_block_size", [((24, 24), None), ((16, 24), 8)])
def test_gpu_backends_match_torch(backend, shape, partition_block_size):
    """fastopt.SOAP on CUDA tensors with the factor EMA on the triton / cuda kron_factor_update (one call per batch
    of same-shape blocks) against the torch backend, across refreshes (square matrices and blocks: full-rank)."""
    import fastopt

    gen = torch.Generator().manual_seed(6)
    p0, grads = torch.randn(shape, generator=gen), [torch.randn(shape, generator=gen) for _ in range(7)]
    moved = {}
    for b in ("torch", backend):
        p = torch.nn.Parameter(p0.cuda())
        opt = fastopt.SOAP([p], precondition_frequency=3, partition_block_size=partition_block_size, backend=b)
        for g in grads:
            p.grad = g.cuda()
            opt.step()
        moved[b] = p.detach().cpu() - p0
    assert ((moved[backend] - moved["torch"]).norm() / moved["torch"].norm()).item() < 1e-4
