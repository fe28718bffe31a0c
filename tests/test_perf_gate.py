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


def test_gate_reads_pytest_benchmark_json(tmp_path, capsys):
    """--from-json: the ratios come from the benchmarks' extra_info; the exit code is the verdict."""
    def bench(name, ratio):
        return {"name": f"test_{name}", "extra_info": {"ratio_name": f"cpu: {name}", "ratio": ratio}}

    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"ratios": BASELINE}))
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"benchmarks": [bench("a", 1.05), bench("b", 1.5),
                                              {"name": "test_plain", "extra_info": {}}]}))
    assert perf_gate.read_ratios(run) == {"cpu: a": (1.05, "test_a"), "cpu: b": (1.5, "test_b")}
    assert perf_gate.main(["--baseline", str(baseline), "--from-json", str(run)]) == 1
    assert "| cpu: b | 2.000 | 1.500 | -25.0% | WORSE |" in capsys.readouterr().out
    assert perf_gate.main(["--baseline", str(baseline), "--from-json", str(run), "--margin", "0.3"]) == 0
