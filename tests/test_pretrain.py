"""The pretraining benchmark: schedules, the scaling-law fit, divergence, resume, and a whole --quick-style run."""

import json
import math

import pytest
import torch

from fastopt.benchmarks import pretrain
from fastopt.benchmarks.corpus import Corpus, load_tokens
from fastopt.benchmarks.llama import PRESETS, Llama
from fastopt.benchmarks.scaling import PowerLaw, fit_power_law
from fastopt.benchmarks.training import Diverged, RunResult, RunSpec, Settings, lr_factor, train

MICRO = PRESETS["micro"]


@pytest.fixture(scope="module")
def corpus():
    return Corpus(*load_tokens(), MICRO.seq_len)


def settings(**kwargs):
    return Settings(MICRO, batch_size=4, evals=3, eval_tokens=2048, checkpoint_every=4, progress=False, **kwargs)


def test_corpus_is_bytes_with_a_held_out_tail(corpus):
    assert corpus.vocab == 256 and len(corpus.train) + len(corpus.held_out) == 5_057_198
    assert len(corpus.held_out) == pytest.approx(0.05 * 5_057_198, abs=1)
    x, y = corpus.batch(seed=0, step=3, batch_size=2)
    assert x.shape == (2, MICRO.seq_len) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(corpus.batch(0, 3, 2)[0], x) and not torch.equal(corpus.batch(0, 4, 2)[0], x)


def test_llama_parameter_count_and_output():
    model = Llama(PRESETS["tiny"])
    width, hidden = 64, PRESETS["tiny"].mlp_hidden
    assert model.non_embedding_parameters() == 2 * (4 * width * width + 3 * width * hidden + 2 * width) + width
    assert model(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, 256)


def test_schedules():
    steps = 100
    wsd = [lr_factor("wsd", s, steps, 0.1, 0.2) for s in range(steps)]
    assert wsd[0] == pytest.approx(0.1) and wsd[9] == 1.0 and wsd[50] == 1.0 and wsd[79] == 1.0
    assert wsd[90] == pytest.approx(0.5) and wsd[-1] == pytest.approx(0.05)
    cosine = [lr_factor("cosine", s, steps, 0.1, 0.2) for s in range(steps)]
    assert cosine[10] == 1.0 and cosine[55] == pytest.approx(0.5, abs=0.02) and cosine[-1] < 0.001
    with pytest.raises(ValueError, match="schedule"):
        lr_factor("linear", 50, steps, 0.1, 0.2)


def test_power_law_fit_recovers_the_law_and_the_speedup():
    law = PowerLaw(alpha=40.0, exponent=0.3, floor=1.5)
    tokens = [1e6, 2e6, 4e6, 8e6]
    fit = fit_power_law(tokens, [law.loss(d) for d in tokens])
    assert fit.exponent == pytest.approx(0.3, rel=1e-2) and fit.floor == pytest.approx(1.5, abs=1e-2)
    # an optimizer that reaches at D the loss AdamW reaches at 2D has speed-up 2
    assert fit.speedup(law.loss(4e6), 2e6) == pytest.approx(2.0, rel=1e-2)
    assert fit.tokens_for(fit.floor - 0.1) == math.inf
    with pytest.raises(ValueError, match="3 budgets"):
        fit_power_law(tokens[:2], [3.0, 2.5])


def test_divergence_names_the_optimizer_and_step(corpus, tmp_path):
    spec = RunSpec("lion", dict(lr=1e30), budget=0.05)
    with pytest.raises(Diverged, match=r"lion: training loss is (nan|inf) at step \d+"):
        train(spec, corpus, settings(), tmp_path)
    assert "lion" in json.loads((tmp_path / "result.json").read_text())["diverged"]


@pytest.mark.parametrize("optimizer", ["adamw", "kron"])
def test_an_interrupted_run_resumes_to_the_same_result(corpus, tmp_path, optimizer):
    spec = RunSpec(optimizer, dict(lr=3e-3), budget=0.02)  # 20 steps, checkpoints every 4
    straight = train(spec, corpus, settings(), tmp_path / "straight")
    assert train(spec, corpus, settings(), tmp_path / "resumed", stop_after=6) is None
    assert (tmp_path / "resumed" / "checkpoint.pt").exists()
    resumed = train(spec, corpus, settings(), tmp_path / "resumed")
    assert resumed.steps == straight.steps == 20
    assert resumed.final_loss == straight.final_loss and resumed.curve[-1][3] == straight.curve[-1][3]
    assert resumed.train_curve == straight.train_curve
    assert not (tmp_path / "resumed" / "checkpoint.pt").exists()


def test_the_benchmark_writes_its_tables_and_plots(tmp_path, capsys):
    out = tmp_path / "results"
    code = pretrain.main(["--preset", "micro", "--optimizers", "adamw,muon", "--budgets", "0.03,0.06,0.12",
                          "--batch-size", "8", "--search-points", "2", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    table = capsys.readouterr().out
    assert "| adamw |" in table and "| muon |" in table and "| fp8 |" in table and "step ms, cpu" in table
    for name in ("results.json", "results.csv", "summary.md", "loss_curves.png", "speedup.png", "step_time.png"):
        assert (out / name).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert results["law"] is not None and len(results["rows"]) == 2
    assert all(isinstance(results["step_times"][name]["torch"], list) for name in ("adamw", "muon"))
    # a second invocation reuses every finished run
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert pretrain.main(["--preset", "micro", "--optimizers", "adamw,muon", "--budgets", "0.03,0.06,0.12",
                          "--batch-size", "8", "--search-points", "2", "--out", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in (out / "runs").iterdir()) == runs


def test_the_state_check_compares_final_training_losses():
    def result(state_dtype, train_loss, held_out):
        spec = RunSpec("adamw", {}, 1.0, state_dtype=state_dtype)
        return RunResult(spec.name, vars(spec), 10, 1000, held_out, curve=[[10, 1000, 1.0, held_out]],
                         train_curve=[[10, train_loss]], fwd_bwd_seconds=0.5, step_seconds=0.1)

    runs = {"adamw": [result("fp32", 2.0, 2.0)]}
    # bf16 +0.4% (allowed 0.5%) with a held-out loss 5% off: passes; fp8 +1.5% (allowed 1%): fails
    state_runs = {"bf16": result("bf16", 2.008, 2.1), "fp8": result("fp8", 2.03, 2.0)}
    report = pretrain.summarise(runs, state_runs, {}, [1.0], (100, 200), 5.0, settings())
    assert [c["ok"] for c in report["state_checks"]] == [True, False]
    assert report["failures"] == ["AdamW fp8 state: final training loss 2.0300 vs fp32 2.0000 (+1.50%; allowed ±1.0%)"]
    assert "| bf16 | 2.0080 | 2.0000 | +0.40% | ±0.5% | yes | 2.1000 | 2.0000 |" in report["markdown"]
