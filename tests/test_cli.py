"""The command line: `python -m fastopt info` and `python -m fastopt bench step`."""

import json
import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "fastopt", *args], capture_output=True, text=True, timeout=600)


def test_info_lists_every_backend_with_a_reason():
    out = run("info")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    backends = {line.split()[0]: line.split()[1:] for line in lines[lines.index("backends") + 1:]}
    assert set(backends) == {"cuda", "triton", "cpu", "torch"}
    assert all(words[0] in ("yes", "no") and len(words) > 1 for words in backends.values())  # with a reason
    assert backends["torch"][0] == "yes"
    assert any(line.startswith("cuda extension") for line in lines)


def test_bench_step_writes_its_table_and_json(tmp_path):
    path = tmp_path / "step.json"
    out = run("bench", "step", "--preset", "tiny", "--rounds", "2", "--json", str(path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| torch.optim.AdamW fused |" in out.stdout and "| fastopt cpu fp8 |" in out.stdout
    results = {r["optimizer"]: r for r in json.loads(path.read_text())}
    assert set(results) == {"adamw", "lion", "mars", "sophia", "adam-mini", "muon", "scion", "root", "soap",
                            "soap-refresh", "soap-blocks", "kron", "kron-2048", "cautious-adamw", "cautious-lion",
                            "cautious-mars"}
    rows = {r["config"]: r for r in results["adamw"]["rows"]}
    peers = [rows["torch.optim.AdamW foreach"], rows["torch.optim.AdamW fused"]]
    assert max(r["speedup_vs_fastest_peer"] for r in peers) == 1.0
    assert rows["fastopt cpu fp32"]["state_bytes_per_param"] >= 8.0
    assert rows["fastopt cpu bf16"]["state_bytes_per_param"] < rows["fastopt cpu fp32"]["state_bytes_per_param"]
    lion = {r["config"]: r for r in results["lion"]["rows"]}
    assert 4.0 <= lion["fastopt cpu fp32"]["state_bytes_per_param"] < 8.0  # one moment
    mars = {r["config"]: r for r in results["mars"]["rows"]}
    assert 8.0 < mars["fastopt cpu fp32"]["state_bytes_per_param"] <= 12.0  # m, v, and g_prev of the matrices
    assert all(r["ms_per_step"] > 0 for result in results.values() for r in result["rows"])
    # every table but AdamW's times fastopt AdamW on the same parameters, for scale
    soap = {r["config"]: r for r in results["soap"]["rows"]}
    assert soap["(scale) fastopt AdamW cpu fp32"]["cost_vs_fastopt_adamw"] == 1.0
    assert soap["fastopt cpu fp32"]["cost_vs_fastopt_adamw"] > 1.0 and "× AdamW step" in out.stdout
    # every fastopt step ran on grads (a peer that clears p.grad must not turn the later steps into no-ops)
    assert all(r["state_bytes_per_param"] > 0 for result in results.values() for r in result["rows"]
               if r["config"].startswith("fastopt"))


def test_bench_ns_writes_its_table_and_json(tmp_path):
    path = tmp_path / "ns.json"
    out = run("bench", "ns", "--shapes", "32x64,64x32", "--rounds", "1", "--json", str(path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| 32x64 | cpu |" in out.stdout and "| 64x32 | torch |" in out.stdout
    rows = json.loads(path.read_text())
    assert {r["backend"] for r in rows} == {"cpu", "torch"} and all(r["GFLOPs"] > 0 for r in rows)


def test_bench_step_times_the_gpu_backends_on_a_gpu(monkeypatch):
    """On a CUDA device the table has the cuda and triton rows and no cpu row (the cpu backend cannot update CUDA
    parameters; once, this raised instead): every backend available, as on a GPU machine."""
    import torch

    from fastopt import backends
    from fastopt.benchmarks.step_throughput import configurations

    monkeypatch.setattr(backends, "probe", lambda backend: backends.Probe(True, "test"))
    labels = [label for label, _, _ in configurations("adamw", torch.device("cuda"), include_slow=True)]
    assert [label for label in labels if label.startswith("fastopt")] == [
        f"fastopt {b} {s}" for b in ("cuda", "triton", "torch") for s in ("fp32", "bf16", "fp8")]
    muon = [label for label, _, _ in configurations("muon", torch.device("cuda"), include_slow=False)]
    assert "fastopt cuda fp32" in muon and "(scale) fastopt AdamW cuda fp32" in muon
    assert not any(" cpu " in label for label in labels + muon)


def test_bench_ns_times_every_backend_that_runs_on_the_device(monkeypatch):
    """Off the CPU: torch, triton and cuda, each with the FLOPs it spends over the dense count (timings stubbed: the
    meta device stands in for a GPU)."""
    import torch

    from fastopt.backends import Probe
    from fastopt.benchmarks import newton_schulz as bench

    calls = []
    monkeypatch.setattr(bench, "probe", lambda backend: Probe(True, "test"))
    monkeypatch.setattr(bench, "newton_schulz", lambda x, **options: calls.append(options["backend"]))
    monkeypatch.setattr(bench, "interleaved_medians",
                        lambda fns, rounds, device: {name: (fn(), 1e-3)[1] for name, fn in fns.items()})
    m, n = 768, 3072
    rows = bench.run([(m, n)], 1, torch.device("meta"), rounds=1, precision="fp32")
    assert [r["backend"] for r in rows] == ["torch", "triton", "cuda"] and calls == ["torch", "triton", "cuda"]
    work = {r["backend"]: r["work"] for r in rows}
    assert work["torch"] == 1.0 and 0.6 < work["triton"] < 0.8  # the triangle of 64-wide tiles
    assert work["cuda"] == (3 * m * m * n + m ** 3) / (4 * m * m * n + 2 * m ** 3)  # SYRK: half of X·Xᵀ and A²
