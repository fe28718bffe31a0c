"""The perf-regression gate: runs the ratio microbenchmarks (benchmarks/test_micro_ratios.py) under
pytest-benchmark, reads the ratios from its JSON and compares them with the committed baseline
(benchmarks/data/perf_baseline.json). Each ratio is a speed-up of one configuration over another timed
interleaved in the same run (higher is better): absolute times are never compared across runs. A ratio more than
``--margin`` below its baseline, or a baseline ratio that was not measured, fails the gate; a ratio that looks
worse is measured once more and the better of its two values counts (noise rarely fails twice, a regression does).

The baseline keeps one set of ratios per kind of CPU (pytest-benchmark's ``brand_raw``): a kernel's speed against
torch's is a property of the CPU as much as of the code. On the Xeon with AMX tiles that CI drew on 2026-11-26,
torch.mm's bf16 and fp32 products and torch's sort ran so much faster than on the AMD EPYC of the first baseline
that the unchanged code of 40f3c7f measured 28–54% below that baseline on three ratios. A CPU with no baseline
of its own is reported, not gated (add its set with ``--update-baseline`` on it).

    python -m fastopt.benchmarks.perf_gate [--json FILE] [--margin 0.15]   # the gate: exit 1 on a regression
    python -m fastopt.benchmarks.perf_gate --update-baseline [--repeat 3]  # refresh the baseline (median of runs)
    python -m fastopt.benchmarks.perf_gate --from-json FILE                # gate an existing run's JSON

``FASTOPT_PERF_GATE_SLOWDOWN=adamw-fp32[:factor]`` makes a measured configuration take ``factor`` (default 2)
times as long (benchmarks/micro.py), to show the gate failing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
SUBSET = HERE / "test_micro_ratios.py"
BASELINE = HERE / "data" / "perf_baseline.json"
MARGIN = 0.15
FAILING = ("WORSE", "MISSING")


@dataclass
class Row:
    """One ratio: its baseline and current value (None where absent) and the verdict."""

    name: str
    baseline: float | None
    now: float | None
    verdict: str


def compare(baseline: dict[str, float], now: dict[str, float], margin: float = MARGIN) -> list[Row]:
    """A row per ratio of either side: WORSE below baseline·(1 − margin), better above baseline·(1 + margin),
    else ok; MISSING where the baseline has a ratio this run lacks, new (not gated) for the reverse."""
    rows = []
    for name in [*baseline, *(n for n in now if n not in baseline)]:
        base, value = baseline.get(name), now.get(name)
        if value is None:
            verdict = "MISSING"
        elif base is None:
            verdict = "new (not gated)"
        elif value < base * (1 - margin):
            verdict = "WORSE"
        else:
            verdict = "better" if value > base * (1 + margin) else "ok"
        rows.append(Row(name, base, value, verdict))
    return rows


def failed(rows: list[Row]) -> bool:
    return any(r.verdict in FAILING for r in rows)


def format_table(rows: list[Row], margin: float) -> str:
    def num(v):
        return "-" if v is None else f"{v:.3f}"

    lines = [f"perf gate: same-run ratios, higher is better; fails below baseline by more than {100 * margin:.0f}%",
             "| ratio | baseline | now | change | verdict |", "|---|---:|---:|---:|---|"]
    for r in rows:
        change = "-" if r.baseline is None or r.now is None else f"{100 * (r.now / r.baseline - 1):+.1f}%"
        lines.append(f"| {r.name} | {num(r.baseline)} | {num(r.now)} | {change} | {r.verdict} |")
    return "\n".join(lines)


def read_ratios(path) -> dict[str, tuple[float, str]]:
    """{ratio name: (value, test name)} of the benchmarks of a pytest-benchmark JSON file that carry a ratio."""
    with open(path) as f:
        benchmarks = json.load(f)["benchmarks"]
    return {b["extra_info"]["ratio_name"]: (b["extra_info"]["ratio"], b["name"])
            for b in benchmarks if "ratio" in b["extra_info"]}


def read_cpu(path) -> str:
    """The kind of CPU a pytest-benchmark JSON file was measured on: its brand string ("?" if absent)."""
    with open(path) as f:
        return json.load(f).get("machine_info", {}).get("cpu", {}).get("brand_raw", "?")


def run_subset(json_path: Path, tests=()) -> dict[str, tuple[float, str]]:
    """Run the gate's benchmarks (or only ``tests``) with pytest-benchmark, its JSON at ``json_path``."""
    cmd = [sys.executable, "-m", "pytest", str(SUBSET), "-q", "-p", "no:cacheprovider",
           "--benchmark-columns=min,median,rounds", f"--benchmark-json={json_path}"]
    code = subprocess.run(cmd + (["-k", " or ".join(tests)] if tests else [])).returncode
    if code:
        raise SystemExit(f"perf gate: the benchmarks failed (pytest exit code {code})")
    return read_ratios(json_path)


def load_baselines(path: Path) -> dict[str, dict[str, float]]:
    """{CPU brand string: {ratio name: baseline}} (an absent file: none)."""
    if not path.exists():
        return {}
    with open(path) as f:
        return {cpu: entry["ratios"] for cpu, entry in json.load(f)["cpus"].items()}


def update_baseline(path: Path, workdir: Path, repeat: int) -> int:
    """Measure ``repeat`` runs and write their median ratios as this CPU's set, keeping the other CPUs' sets."""
    runs = [run_subset(workdir / f"baseline-{i}.json") for i in range(repeat)]
    ratios = {name: round(statistics.median(run[name][0] for run in runs), 4) for name in runs[0]}
    cpu = read_cpu(workdir / "baseline-0.json")
    cpus = {name: {"ratios": r} for name, r in load_baselines(path).items()} | {cpu: {"ratios": ratios}}
    with open(path, "w") as f:
        json.dump({"refresh": "python -m fastopt.benchmarks.perf_gate --update-baseline (on the CPU to refresh)",
                   "cpus": cpus}, f, indent=2)
        f.write("\n")
    print(f"wrote {path}: the median of {repeat} runs, for {cpu}")
    return 0


def gate(baseline_path: Path, json_path: Path, margin: float, from_json: str | None) -> int:
    measured = read_ratios(from_json) if from_json else run_subset(json_path)
    now = {name: value for name, (value, _) in measured.items()}
    cpu = read_cpu(from_json or json_path)
    baselines = load_baselines(baseline_path)
    if cpu not in baselines:
        print(format_table(compare({}, now, margin), margin))
        print(f"perf gate: no baseline for this CPU ({cpu}; baselines: {', '.join(baselines) or 'none'}): not gated. "
              "Add one with --update-baseline on it.")
        return 0
    baseline = baselines[cpu]
    print(f"perf gate: the baseline of {cpu}")
    worse = [r.name for r in compare(baseline, now, margin) if r.verdict == "WORSE"]
    if worse and not from_json:
        print(f"perf gate: measuring again what looks worse: {', '.join(worse)}", flush=True)
        again = run_subset(json_path.with_suffix(".again.json"), sorted({measured[n][1] for n in worse}))
        now.update((n, max(now[n], again[n][0])) for n in worse if n in again)
    rows = compare(baseline, now, margin)
    print(format_table(rows, margin))
    return 1 if failed(rows) else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastopt.benchmarks.perf_gate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="keep the pytest-benchmark JSON here (default: a temporary file)")
    parser.add_argument("--baseline", default=str(BASELINE))
    parser.add_argument("--margin", type=float, default=MARGIN, help="allowed drop of a ratio (default 0.15)")
    parser.add_argument("--from-json", help="gate the ratios of this pytest-benchmark JSON instead of running")
    parser.add_argument("--update-baseline", action="store_true", help="measure and write the baseline")
    parser.add_argument("--repeat", type=int, default=3, help="--update-baseline: runs to take the median of")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.update_baseline:
            return update_baseline(Path(args.baseline), Path(tmp), args.repeat)
        json_path = Path(args.json) if args.json else Path(tmp) / "perf-gate.json"
        return gate(Path(args.baseline), json_path, args.margin, args.from_json)


if __name__ == "__main__":
    raise SystemExit(main())
