"""Bad input gets a clear error that names the problem, never silent corruption."""

import warnings

import pytest
import torch

import fastopt


def param(*shape, **kw):
    p = torch.nn.Parameter(torch.randn(*shape, **kw))
    p.grad = torch.randn_like(p)
    return p


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "invalid lr"),
    (dict(lr=float("nan")), "invalid lr"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), "lr as a tensor"),
    (dict(eps=-1e-8), "invalid eps"),
    (dict(weight_decay=-0.1), "invalid weight_decay"),
    (dict(betas=(1.0, 0.999)), "invalid beta1"),
    (dict(betas=(0.9, -0.1)), "invalid beta2"),
    (dict(betas=(0.9,)), "betas must be a pair"),
    (dict(backend="gpu"), "backend must be one of"),
    (dict(state_dtype="int4"), "state_dtype must be one of"),
    (dict(block_size=100), "block_size must be a power of two"),
    (dict(master_weights=True, stochastic_rounding=True), "alternatives"),
    (dict(differentiable=True), "not differentiable"),
])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastopt.AdamW([param(3)], **kwargs)


def test_sparse_grad():
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        fastopt.AdamW([p], backend="cpu").step()


def test_complex_param():
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    p.grad = torch.randn_like(p)
    with pytest.raises(TypeError, match="complex parameters"):
        fastopt.AdamW([p], backend="cpu").step()


def test_grad_dtype_or_shape_mismatch():
    p = torch.nn.Parameter(torch.randn(3, 4))
    p.grad_dtype = None  # torch would refuse the assignment otherwise
    p.grad = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="does not match its parameter"):
        fastopt.AdamW([p], backend="cpu").step()


def test_unavailable_backend_raises_with_reason():
    if torch.cuda.is_available():
        pytest.skip("cuda is available here")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: no CUDA device"):
        fastopt.AdamW([param(3)], backend="cuda")


def test_float64_params_need_the_torch_backend():
    with pytest.raises(TypeError, match="float64"):
        fastopt.AdamW([param(3, dtype=torch.float64)], backend="cpu").step()
    p = param(3, dtype=torch.float64)
    fastopt.AdamW([p], backend="auto").step()  # auto: float64 runs on the reference


def test_state_dict_of_another_optimizer():
    p = param(3)
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    sgd.step()
    with pytest.raises(ValueError, match="another optimizer"):
        fastopt.AdamW([p], backend="cpu").load_state_dict(sgd.state_dict())


def test_state_dict_with_wrong_shapes():
    a, b = param(3), param(5)
    opt = fastopt.AdamW([a], backend="cpu")
    opt.step()
    with pytest.raises(ValueError, match="exp_avg has shape"):
        fastopt.AdamW([b], backend="cpu").load_state_dict(opt.state_dict())


def test_state_dict_with_wrong_group_count():
    opt = fastopt.AdamW([param(3)], backend="cpu")
    other = fastopt.AdamW([{"params": [param(3)]}, {"params": [param(2)]}], backend="cpu")
    with pytest.raises(ValueError):
        opt.load_state_dict(other.state_dict())


@pytest.mark.parametrize("kwargs,match", [
    (dict(mars_type="mars-lion"), "mars-adamw"),
    (dict(gamma=-0.1), "invalid gamma"),
    (dict(betas_1d=(0.9, 1.5)), "invalid beta2"),
    (dict(lr=0.0), "lr must not be 0"),
])
def test_bad_mars_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastopt.MARS([param(3, 3)], **kwargs)


@pytest.mark.parametrize("kwargs,match", [(dict(bs=0), "bs"), (dict(rho=-1.0), "invalid rho")])
def test_bad_sophia_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastopt.Sophia([param(3)], **kwargs)
    if "bs" in kwargs:
        with pytest.raises(ValueError, match="bs"):
            fastopt.Sophia([param(3)]).step(bs=-5)


def test_kernel_checks_devices_and_dtypes():
    """The C++ op itself refuses inconsistent tensor lists (a call that bypassed the optimizer)."""
    fastopt.AdamW([param(1)], backend="cpu")  # loads the extension
    p, g = torch.randn(10), torch.randn(10)
    m, v = torch.zeros(10), torch.zeros(10, dtype=torch.bfloat16)
    step = torch.ones(())
    with pytest.raises(RuntimeError, match="exp_avg_sqs\\[0\\] must be a contiguous cpu Float"):
        torch.ops.fastopt.adam_step_([p], [g], [m], [v], [], [], [], [], [], [step], None, 1e-3, 0.9, 0.999,
                                     1e-8, 0.0, False, False, False, 256, -1, None, None)
    with pytest.raises(RuntimeError, match="grads has 2 tensors, expected 1"):
        torch.ops.fastopt.adam_step_([p], [g, g], [m], [m], [], [], [], [], [], [step], None, 1e-3, 0.9, 0.999,
                                     1e-8, 0.0, False, False, False, 256, -1, None, None)
    with pytest.raises(RuntimeError, match="lion_step_: exp_avgs\\[0\\] must be a contiguous cpu Float tensor of 10"):
        torch.ops.fastopt.lion_step_([p], [g], [torch.zeros(9)], [], [], None, 1e-4, 0.9, 0.99, 0.0, False, False,
                                     256, -1, None, None)
    with pytest.raises(RuntimeError, match="mars_step_: last_grads has 0 tensors, expected 1"):
        torch.ops.fastopt.mars_step_([p], [g], [m], [m], [], [], [], [], [], [], [], [step], None, 1e-3, 0.9, 0.999,
                                     1e-8, 0.0, 0.025, False, False, 256, -1, None, None)


def test_fp8_state_without_scales_is_refused_before_loading():
    p = param(64, 128)
    opt = fastopt.AdamW([p], backend="cpu", state_dtype="fp8")
    opt.step()
    sd = opt.state_dict()
    del sd["state"][0]["exp_avg_scale"]
    fresh = fastopt.AdamW([p], backend="cpu", state_dtype="fp8")
    with pytest.raises(ValueError, match="exp_avg is float8 codes without exp_avg_scale"):
        fresh.load_state_dict(sd)
    assert not fresh.state  # nothing was loaded


def test_fastopt_backend_env_sets_the_default(monkeypatch):
    monkeypatch.setenv("FASTOPT_BACKEND", "torch")
    assert fastopt.AdamW([param(3)]).backend == "torch"
    assert fastopt.AdamW([param(3)], backend="cpu").backend == "cpu"  # an explicit argument wins


def test_auto_falls_back_to_torch_with_one_warning():
    from fastopt import backends

    backends._warn_fallback.cache_clear()
    with pytest.warns(RuntimeWarning, match="no fused kernel for meta tensors"):
        assert backends.select("auto", torch.device("meta"), torch.float32) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.select("auto", torch.device("meta"), torch.float32) == "torch"  # once only


def test_auto_takes_the_optimizers_gpu_order_on_cuda_tensors(monkeypatch):
    """CUDA buckets: the optimizer's GPU_ORDER, the first available (README "On a GPU": the CUDA element-wise engine
    is the faster; Muon and ROOT ran faster on triton), else torch."""
    from fastopt import backends

    cuda = torch.device("cuda")
    available = {"triton", "cuda"}
    monkeypatch.setattr(backends, "probe", lambda b: backends.Probe(b in available, "test"))
    assert fastopt.AdamW.GPU_ORDER == fastopt.Lion.GPU_ORDER == fastopt.SOAP.GPU_ORDER == ("cuda", "triton")
    assert fastopt.Muon.GPU_ORDER == fastopt.ROOT.GPU_ORDER == ("triton", "cuda")
    assert backends.select("auto", cuda, torch.bfloat16) == "cuda"
    assert backends.select("auto", cuda, torch.bfloat16, fastopt.Muon.GPU_ORDER) == "triton"
    available.discard("cuda")
    assert backends.select("auto", cuda, torch.float32) == "triton"
    available.clear()
    backends._warn_fallback.cache_clear()
    with pytest.warns(RuntimeWarning, match="no fused kernel for cuda tensors"):
        assert backends.select("auto", cuda, torch.float32) == "torch"
