"""The perf gate's comparison (fastopt.benchmarks.perf_gate) on synthetic ratios and pytest-benchmark JSON:
no timing."""

import json

from fastopt.benchmarks import perf_gate

BASELINE = {"cpu: a": 1.0, "cpu: b": 2.0}


def verdicts(now, margin=0.15):
    return {r.name: r.verdict for r in perf_gate.compare(BASELINE, now, margin)}


def test_within_margin_passes():
    rows = perf_gate.compare(BASELINE, {"cpu: a": 0.9, "cpu: b": 2.2})
    assert [r.verdict for r in rows] == ["ok", "ok"] and not perf_gate.failed(rows)


def test_regression_beyond_margin_fails():
    rows = perf_gate.compare(BASELINE, {"cpu: a": 0.84, "cpu: b": 2.0})
    assert {r.name: r.verdict for r in rows} == {"cpu: a": "WORSE", "cpu: b": "ok"} and perf_gate.failed(rows)
    assert verdicts({"cpu: a": 0.84, "cpu: b": 2.0}, margin=0.2)["cpu: a"] == "ok"  # the margin is configurable


def test_improvement_passes():
    rows = perf_gate.compare(BASELINE, {"cpu: a": 3.0, "cpu: b": 2.0})
    assert rows[0].verdict == "better" and not perf_gate.failed(rows)


def test_missing_ratio_fails_and_new_ratio_is_reported():
    rows = perf_gate.compare(BASELINE, {"cpu: a": 1.0, "cpu: c": 5.0})
    expected = {"cpu: a": "ok", "cpu: b": "MISSING", "cpu: c": "new (not gated)"}
    assert verdicts({"cpu: a": 1.0, "cpu: c": 5.0}) == expected
    assert perf_gate.failed(rows)
    table = perf_gate.format_table(rows, 0.15)
    assert "| cpu: b | 2.000 | - | - | MISSING |" in table and "| cpu: c | - | 5.000 | - | new (not gated) |" in table


def bench(name, ratio):
    return {"name": f"test_{name}", "extra_info": {"ratio_name": f"cpu: {name}", "ratio": ratio}}


def run_json(path, cpu, benchmarks):
    path.write_text(json.dumps({"machine_info": {"cpu": {"brand_raw": cpu}}, "benchmarks": benchmarks}))
    return path


def test_gate_reads_pytest_benchmark_json(tmp_path, capsys):
    """--from-json: the ratios come from the benchmarks' extra_info, the baseline is that CPU's; the exit code is
    the verdict."""
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"cpus": {"CPU X": {"ratios": BASELINE}, "CPU Y": {"ratios": {"cpu: a": 9.0}}}}))
    run = run_json(tmp_path / "run.json", "CPU X", [bench("a", 1.05), bench("b", 1.5),
                                                     {"name": "test_plain", "extra_info": {}}])
    assert perf_gate.read_ratios(run) == {"cpu: a": (1.05, "test_a"), "cpu: b": (1.5, "test_b")}
    assert perf_gate.read_cpu(run) == "CPU X"
    assert perf_gate.main(["--baseline", str(baseline), "--from-json", str(run)]) == 1
    out = capsys.readouterr().out
    assert "the baseline of CPU X" in out and "| cpu: b | 2.000 | 1.500 | -25.0% | WORSE |" in out
    assert perf_gate.main(["--baseline", str(baseline), "--from-json", str(run), "--margin", "0.3"]) == 0


def test_a_cpu_without_a_baseline_is_reported_not_gated(tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"cpus": {"CPU X": {"ratios": BASELINE}}}))
    run = run_json(tmp_path / "run.json", "CPU Z", [bench("a", 0.1)])
    assert perf_gate.main(["--baseline", str(baseline), "--from-json", str(run)]) == 0
    out = capsys.readouterr().out
    assert "| cpu: a | - | 0.100 | - | new (not gated) |" in out
    assert "no baseline for this CPU (CPU Z; baselines: CPU X): not gated" in out


def test_update_baseline_writes_this_cpus_set_and_keeps_the_others(tmp_path, monkeypatch):
    """The median of the runs, under this CPU's name; the other CPUs' sets stay."""
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"cpus": {"CPU X": {"ratios": BASELINE}}}))
    values = iter([1.0, 3.0, 2.0])

    def fake_run(json_path, tests=()):
        value = next(values)
        run_json(json_path, "CPU Y", [bench("a", value)])
        return {"cpu: a": (value, "test_a")}

    monkeypatch.setattr(perf_gate, "run_subset", fake_run)
    work = tmp_path / "work"
    work.mkdir()
    assert perf_gate.update_baseline(baseline, work, 3) == 0
    assert perf_gate.load_baselines(baseline) == {"CPU X": BASELINE, "CPU Y": {"cpu: a": 2.0}}
