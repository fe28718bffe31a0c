"""End-to-end pretraining benchmark, measured as "Fantastic Pretraining Optimizers" (Wen et al. 2025) does.

    python -m fastopt bench pretrain [--quick] [--preset tiny] [--optimizers all|adamw,muon,...]
                                     [--budgets 1,2,4] [--schedule wsd|cosine] [--out DIR] [--data FILE]

Every optimizer of ``fastopt.OPTIMIZERS`` (built by ``fastopt.create_optimizer``) trains the same Llama model
on the same batches at each token budget (multiples of Chinchilla: 20 tokens per non-embedding parameter).
A bounded coordinate-wise search over the learning rate (×2 / ×½ steps from the optimizer's base value while
the held-out loss improves, at a quarter of the smallest budget) picks the rate every budget uses. AdamW's
final held-out losses give the fit L(D) = α·D^(−B) + β and every run its speed-up D_eff / D
(benchmarks/scaling.py). Also reported: fwd+bwd vs optimizer-step time, time to reach AdamW's final loss,
state bytes, and the low-precision-state check (AdamW bf16 / fp8 state within 0.5% / 1% of fp32's final training
loss). A failed check, or a run that diverges or does not learn, fails the command.

Results go to ``--out`` (default ``pretrain-results/<preset>``): one folder per run (result.json and, while
it trains, checkpoint.pt: a rerun skips finished runs and resumes interrupted ones), results.json,
results.csv, summary.md and the plots loss_curves.png, speedup.png, step_time.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

import fastopt
from fastopt import backends

from .corpus import Corpus, load_tokens
from .llama import PRESETS, Llama
from .scaling import fit_power_law
from .training import Diverged, RunSpec, Settings, held_out_loss, load_result, time_steps, train

# Base hyperparameters for the small models: the learning rates are the best the full tiny run's search found
# (2026-11-26: the searched multiple folded in), so the search starts at the optimum and --quick runs there.
# Optimizers not named here start from their constructor's defaults.
BASE = {
    "adamw": dict(lr=6e-3, betas=(0.9, 0.95), weight_decay=0.1),
    "nadamw": dict(lr=6e-3, betas=(0.9, 0.95), weight_decay=0.1),
    "lion": dict(lr=1.2e-3, betas=(0.9, 0.99), weight_decay=1.0),
    "mars": dict(lr=1.2e-2, weight_decay=0.1, lr_1d=1.2e-2),
    "sophia": dict(lr=1.2e-3, weight_decay=0.1),
    "adam-mini": dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1),
    "muon": dict(lr=1.2e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"),
    # Scion's unconstrained nanoGPT settings (the README's example): hidden norms scaled 50, the head 3000
    "scion": dict(lr=2**-11, role_options={"hidden": {"scale": 50.0}, "output": {"scale": 3000.0}}),
    "root": dict(lr=1.2e-2, weight_decay=0.1),
    "soap": dict(lr=1.2e-2, weight_decay=0.1),
    "kron": dict(lr=1.2e-3, weight_decay=0.1),
}
# state_budget: where AdamW's bf16/fp8 state is checked against fp32 (the run budget nearest to it)
FULL = dict(budgets=(1.0, 2.0, 4.0), batch_size=32, search_points=3, search_budget=0.25, eval_tokens=65536,
            state_budget=1.0)
QUICK = dict(budgets=(1 / 16, 1 / 8, 1 / 4), batch_size=16, search_points=1, search_budget=1.0, eval_tokens=16384,
             state_budget=1 / 4)
STATE_TOLERANCE = {"bf16": 0.005, "fp8": 0.01}


def main(argv=None) -> int:
    args = parse_args(argv)
    mode = QUICK if args.quick else FULL
    budgets = sorted(args.budgets or mode["budgets"])
    tokens, vocab = load_tokens(args.data, args.token_dtype)
    config = replace(PRESETS[args.preset], vocab=vocab)
    corpus = Corpus(tokens, vocab, config.seq_len)
    settings = Settings(config, args.batch_size or mode["batch_size"], seed=args.seed, device=args.device,
                        eval_tokens=mode["eval_tokens"], progress=not args.no_progress)
    out = Path(args.out or f"pretrain-results/{args.preset}{'-quick' if args.quick else ''}")
    names = list(fastopt.OPTIMIZERS) if args.optimizers == "all" else args.optimizers.split(",")
    unknown = [n for n in names if n not in fastopt.OPTIMIZERS]
    if unknown or "adamw" not in names:
        raise SystemExit(f"--optimizers must include adamw (the baseline) and name only {sorted(fastopt.OPTIMIZERS)}; "
                         f"unknown: {unknown}")
    torch.manual_seed(settings.seed)
    probe = Llama(config)
    n_params, initial_loss = probe.non_embedding_parameters(), held_out_loss(probe, corpus, settings)
    all_params = sum(p.numel() for p in probe.parameters())
    print(f"{args.preset}: {n_params:,} non-embedding parameters, budgets {budgets}× Chinchilla = "
          f"{[round(b * 20 * n_params) for b in budgets]} tokens; results in {out}", file=sys.stderr)

    def run(spec: RunSpec):
        run_dir = out / "runs" / spec.name
        done = load_result(run_dir)
        if done is not None:
            return done
        try:
            return train(spec, corpus, settings, run_dir)
        except Diverged as error:
            print(f"\n{error}", file=sys.stderr)
            return load_result(run_dir)

    runs = {}
    for name in names:
        base = RunSpec(name, BASE.get(name, {}), budgets[0] * mode["search_budget"],
                       schedule=args.schedule, backend=args.backend)
        best = search_lr(run, base, args.search_points or mode["search_points"]).run_spec
        runs[name] = [run(replace(best, budget=b)) for b in budgets]
    fp32 = min(runs["adamw"], key=lambda r: abs(math.log(r.run_spec.budget / mode["state_budget"])))
    state_runs = {dtype: run(replace(fp32.run_spec, state_dtype=dtype)) for dtype in STATE_TOLERANCE}
    print("timing the step on each backend", file=sys.stderr)
    step_times = {name: backend_step_times(results[0].run_spec, corpus, settings) for name, results in runs.items()}
    report = summarise(runs, state_runs, step_times, budgets, (n_params, all_params), initial_loss, settings)
    write_outputs(out, report, runs, state_runs)
    print(report["markdown"])
    if report["failures"]:
        print("\n".join(["FAILED:"] + report["failures"]), file=sys.stderr)
        return 1
    return 0


def search_lr(run, base: RunSpec, points: int):
    """Coordinate-wise search over the learning rate in ×2 steps, at most ``points`` runs: from the base
    rate, go the way the held-out loss improves until it stops improving. The best run, with its spec."""
    def attempt(scale):
        return run(replace(base, lr_scale=scale))

    def loss(result):
        return result.final_loss if not result.diverged and math.isfinite(result.final_loss) else math.inf

    best = attempt(base.lr_scale)
    tried = 1
    for direction in (2.0, 0.5):
        moved = False
        while tried < points:
            candidate = attempt(best.run_spec.lr_scale * direction)
            tried += 1
            if loss(candidate) >= loss(best):
                break
            best, moved = candidate, True
        if moved:
            break
    return best


def backend_step_times(spec: RunSpec, corpus: Corpus, settings: Settings) -> dict:
    """{backend: (fwd+bwd ms, optimizer-step ms) or the reason it cannot run} for every fastopt backend that
    runs on the device."""
    device = torch.device(settings.device)
    times = {}
    for backend in ("torch", "cpu") if device.type == "cpu" else ("torch", "triton", "cuda"):
        if not backends.probe(backend).available:
            times[backend] = backends.probe(backend).reason
            continue
        try:
            times[backend] = time_steps(replace(spec, backend=backend), corpus, replace(settings, progress=False))
        except NotImplementedError as error:
            times[backend] = str(error)
    return times


def summarise(runs: dict, state_runs: dict, step_times: dict, budgets, param_counts: tuple[int, int],
              initial_loss: float, settings: Settings):
    """The tables (Markdown), the fitted law, per-run speed-ups, and the failed checks. ``param_counts``:
    (non-embedding, all) parameters of the model."""
    n_params, all_params = param_counts
    failures = []
    adamw = runs["adamw"]
    law = None
    if len(budgets) >= 3 and all(not r.diverged for r in adamw):
        law = fit_power_law([r.tokens for r in adamw], [r.final_loss for r in adamw])
    rows = []
    target = adamw[-1].final_loss
    adamw_seconds = adamw[-1].fwd_bwd_seconds + adamw[-1].step_seconds
    for name, results in runs.items():
        for r in results:
            if r.diverged:
                failures.append(r.diverged)
            elif not r.final_loss < initial_loss:
                failures.append(f"{r.name}: held-out loss {r.final_loss:.4f} did not fall below the initial "
                                f"{initial_loss:.4f}")
        last = results[-1]
        reached = next((seconds for _, _, seconds, loss in last.curve if loss <= target), None)
        rows.append({
            "optimizer": name, "lr_scale": results[0].run_spec.lr_scale,
            "losses": [r.final_loss for r in results],
            "speedups": [law.speedup(r.final_loss, r.tokens) if law and not r.diverged else math.nan for r in results],
            "fwd_bwd_ms": 1e3 * last.fwd_bwd_seconds / last.steps, "step_ms": 1e3 * last.step_seconds / last.steps,
            "state_bytes_per_param": last.state_bytes / all_params,
            "seconds_to_adamw_loss": reached, "adamw_seconds": adamw_seconds,
        })
    # the low-precision state check compares training losses: the same batches in the same order, where two
    # fp32 seeds differ by 0.07% (on the held-out loss by 2%: README)
    fp32 = next(r for r in runs["adamw"] if r.run_spec.budget == next(iter(state_runs.values())).run_spec.budget)
    checks = []
    for dtype, r in state_runs.items():
        change = (r.final_train_loss - fp32.final_train_loss) / fp32.final_train_loss
        ok = not r.diverged and abs(change) <= STATE_TOLERANCE[dtype]
        checks.append({"state_dtype": dtype, "train_loss": r.final_train_loss, "fp32_train_loss": fp32.final_train_loss,
                       "change": change, "held_out_loss": r.final_loss, "fp32_held_out_loss": fp32.final_loss,
                       "ok": ok})
        if not ok:
            failures.append(f"AdamW {dtype} state: final training loss {r.final_train_loss:.4f} vs fp32 "
                            f"{fp32.final_train_loss:.4f} ({change:+.2%}; allowed ±{STATE_TOLERANCE[dtype]:.1%})")
    markdown = _markdown(rows, checks, fp32.run_spec.budget, step_times, budgets, law, n_params, settings)
    return {"rows": rows, "state_checks": checks, "step_times": step_times, "law": asdict(law) if law else None,
            "failures": failures, "markdown": markdown,
            "budgets": list(budgets), "non_embedding_params": n_params, "initial_loss": initial_loss}


def _markdown(rows, checks, state_budget, step_times, budgets, law, n_params, settings) -> str:
    budget_cols = [f"{b:g}×" for b in budgets]
    fit = f"L(D) = {law.alpha:.4g}·D^(−{law.exponent:.4g}) + {law.floor:.4g}." if law else "(no fit: < 3 budgets)."
    lines = [f"Llama {settings.config.width}w×{settings.config.layers}L (seq {settings.config.seq_len}, "
             f"{n_params:,} non-embedding params), batch {settings.batch_size}, device {settings.device}. "
             f"Held-out loss at each budget (× Chinchilla); speed-up = D_eff / D against AdamW's fit {fit}",
             "",
             "| optimizer | lr × base | " + " | ".join(f"loss {c}" for c in budget_cols) + " | "
             + " | ".join(f"speed-up {c}" for c in budget_cols)
             + " | fwd+bwd ms/step | opt step ms/step | step share | state B/param | s to AdamW's loss |",
             "|---|---:|" + "---:|" * (2 * len(budgets)) + "---:|---:|---:|---:|---:|"]
    for row in rows:
        share = row["step_ms"] / (row["step_ms"] + row["fwd_bwd_ms"])
        reached = "—" if row["seconds_to_adamw_loss"] is None else f"{row['seconds_to_adamw_loss']:.1f}"
        lines.append(f"| {row['optimizer']} | {row['lr_scale']:g} | "
                     + " | ".join(f"{v:.4f}" for v in row["losses"]) + " | "
                     + " | ".join(f"{v:.2f}" for v in row["speedups"])
                     + f" | {row['fwd_bwd_ms']:.1f} | {row['step_ms']:.2f} | {share:.0%} | "
                     f"{row['state_bytes_per_param']:.1f} | {reached} |")
    lines += ["", f"AdamW with low-precision state (budget {state_budget:g}×): final training loss (mean of the last "
              "eighth of the steps, the same batches) against fp32 state's; held-out loss for reference:", "",
              "| state | train loss | fp32 | change | allowed | ok | held-out | fp32 held-out |",
              "|---|---:|---:|---:|---:|---|---:|---:|"]
    for c in checks:
        lines.append(f"| {c['state_dtype']} | {c['train_loss']:.4f} | {c['fp32_train_loss']:.4f} | "
                     f"{c['change']:+.2%} | ±{STATE_TOLERANCE[c['state_dtype']]:.1%} | {'yes' if c['ok'] else 'NO'} | "
                     f"{c['held_out_loss']:.4f} | {c['fp32_held_out_loss']:.4f} |")
    names = sorted({backend for times in step_times.values() for backend in times})
    lines += ["", "Optimizer step per backend (median ms of 20 training steps; fwd+bwd for scale):", "",
              "| optimizer | fwd+bwd ms | " + " | ".join(f"step ms, {b}" for b in names) + " |",
              "|---|---:|" + "---:|" * len(names)]
    for optimizer, times in step_times.items():
        measured = [t for t in times.values() if isinstance(t, tuple)]
        fwd = f"{measured[0][0]:.1f}" if measured else "—"
        cells = [f"{times[b][1]:.2f}" if isinstance(times.get(b), tuple) else "—" for b in names]
        lines.append(f"| {optimizer} | {fwd} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(out: Path, report: dict, runs: dict, state_runs: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    every = [r for results in runs.values() for r in results] + list(state_runs.values())
    (out / "results.json").write_text(json.dumps({k: v for k, v in report.items() if k != "markdown"}
                                                  | {"runs": [asdict(r) for r in every]}, indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "optimizer", "budget", "lr_scale", "state_dtype", "steps", "tokens",
                         "held_out_loss", "fwd_bwd_s", "step_s", "state_bytes", "diverged"])
        for r in every:
            writer.writerow([r.name, r.spec["optimizer"], r.spec["budget"], r.spec["lr_scale"], r.spec["state_dtype"],
                             r.steps, r.tokens, r.final_loss, r.fwd_bwd_seconds, r.step_seconds, r.state_bytes,
                             r.diverged])
    (out / "summary.md").write_text(report["markdown"] + "\n")
    _plot(out, report, runs)


def _plot(out: Path, report: dict, runs: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, results in runs.items():
        curve = results[-1].curve
        ax.plot([c[1] for c in curve], [c[3] for c in curve], label=name, marker=".")
    ax.set(xlabel="tokens", ylabel="held-out loss", title=f"held-out loss at {report['budgets'][-1]:g}× Chinchilla")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in report["rows"]:
        ax.plot(report["budgets"], row["speedups"], label=row["optimizer"], marker="o")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xscale="log", xlabel="budget (× Chinchilla)", ylabel="speed-up vs AdamW (D_eff / D)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "speedup.png", dpi=120)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [row["optimizer"] for row in report["rows"]]
    fwd = [row["fwd_bwd_ms"] for row in report["rows"]]
    ax.bar(names, fwd, label="fwd+bwd")
    ax.bar(names, [row["step_ms"] for row in report["rows"]], bottom=fwd, label="optimizer step")
    ax.set(ylabel="ms per training step")
    ax.tick_params(axis="x", rotation=45)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "step_time.png", dpi=120)
    plt.close("all")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="fastopt bench pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="budgets 1/16, 1/8, 1/4 × Chinchilla, batch 16, no search: the learning rates the full "
                             "tiny run's search picked")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--optimizers", default="all", help="'all' or a comma-separated list (adamw required)")
    parser.add_argument("--budgets", type=lambda s: [float(x) for x in s.split(",")],
                        help="multiples of Chinchilla (default 1,2,4; --quick: 1/16,1/8,1/4)")
    parser.add_argument("--schedule", default="wsd", choices=["wsd", "cosine"])
    parser.add_argument("--search-points", type=int, help="most runs of the learning-rate search (default 3)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--backend", help="fastopt backend for every optimizer (default: auto)")
    parser.add_argument("--data", help="text file (.txt/.gz, bytes) or pre-tokenised .bin (default: the bundled "
                                       "Shakespeare corpus)")
    parser.add_argument("--token-dtype", default="uint16", choices=["uint16", "uint32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="results directory")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)
