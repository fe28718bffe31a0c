"""One pretraining run of the benchmark: a Llama model, one optimizer configuration, one token budget.

Each step: fwd+bwd (timed), gradient clipping, ``opt.step()`` (timed apart), the learning-rate schedule.
Held-out loss at ``evals`` evenly spaced points and at the end. A checkpoint (model, optimizer, schedule,
step, curves, timings) is written every ``checkpoint_every`` steps; a run started again resumes from it and
ends exactly where the uninterrupted run ends (batches are a function of (seed, step)). A non-finite loss
stops the run with :class:`Diverged`, which names the optimizer and the step.
"""

from __future__ import annotations

import inspect
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import fastopt
from fastopt.optim.base import tensor_bytes

from .corpus import Corpus
from .llama import Llama, LlamaConfig

CHINCHILLA_TOKENS_PER_PARAM = 20


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class RunSpec:
    """What one run trains: optimizer, its options, budget (× Chinchilla), schedule."""

    optimizer: str
    options: dict
    budget: float
    lr_scale: float = 1.0
    state_dtype: str = "fp32"
    schedule: str = "wsd"
    backend: str | None = None

    @property
    def name(self) -> str:
        parts = [self.optimizer, f"{self.budget:g}x", f"lr{self.lr_scale:g}", self.schedule]
        parts += [self.state_dtype] if self.state_dtype != "fp32" else []
        parts += [self.backend] if self.backend else []
        return "-".join(parts)


@dataclass
class Settings:
    """What every run of a benchmark shares."""

    config: LlamaConfig
    batch_size: int
    seed: int = 0
    device: str = "cpu"
    warmup: float = 0.1
    decay: float = 0.2  # warmup-stable-decay: the last 20% of steps decay linearly to 0
    clip: float = 1.0
    evals: int = 8
    eval_tokens: int = 65536
    checkpoint_every: int = 200
    hessian_every: int = 10  # optimizers with update_hessian() (Sophia): Gauss-Newton-Bartlett every k steps
    progress: bool = True


@dataclass
class RunResult:
    name: str
    spec: dict
    steps: int
    tokens: int
    final_loss: float = math.nan  # held-out
    curve: list = field(default_factory=list)  # [step, tokens, seconds, held-out loss]
    train_curve: list = field(default_factory=list)  # [step, mean train loss since the last point]
    fwd_bwd_seconds: float = 0.0
    step_seconds: float = 0.0
    state_bytes: int = 0
    diverged: str = ""

    @property
    def run_spec(self) -> RunSpec:
        return RunSpec(**self.spec)

    @property
    def final_train_loss(self) -> float:
        """The mean training loss over the last eighth of the steps (the batches every run of a seed shares)."""
        return self.train_curve[-1][1] if self.train_curve else math.nan


def steps_for(spec: RunSpec, settings: Settings, non_embedding: int) -> int:
    tokens = spec.budget * CHINCHILLA_TOKENS_PER_PARAM * non_embedding
    return max(1, round(tokens / (settings.batch_size * settings.config.seq_len)))


def lr_factor(schedule: str, step: int, steps: int, warmup: float, decay: float) -> float:
    """The multiplier of the base learning rate at ``step`` (0-based) of ``steps``: linear warmup, then
    constant and a linear decay to 0 over the last ``decay`` fraction (wsd) or a cosine to 0 (cosine)."""
    warm = max(1, round(warmup * steps))
    if step < warm:
        return (step + 1) / warm
    if schedule == "wsd":
        decay_steps = max(1, round(decay * steps))
        return min(1.0, (steps - step) / decay_steps)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
    raise ValueError(f"schedule must be 'wsd' or 'cosine', got {schedule!r}")


def build_optimizer(model: Llama, spec: RunSpec, settings: Settings):
    options = dict(spec.options)
    for key in ("lr", "lr_1d"):
        if key in options:
            options[key] *= spec.lr_scale
    cls = fastopt.OPTIMIZERS[spec.optimizer]
    # what a constructor may need to know about the model and the batch (Adam-mini's heads, Sophia's tokens)
    facts = dict(dim=settings.config.width, n_heads=settings.config.heads,
                 bs=settings.batch_size * settings.config.seq_len)
    options.update({k: v for k, v in facts.items() if k in inspect.signature(cls).parameters})
    if spec.state_dtype != "fp32" or spec.backend:
        options.update(state_dtype=spec.state_dtype, backend=spec.backend)
    if "lr" not in options and spec.lr_scale != 1.0:
        options["lr"] = _default_lr(cls) * spec.lr_scale
    return fastopt.create_optimizer(model, spec.optimizer, **options)


def _default_lr(cls) -> float:
    return inspect.signature(cls).parameters["lr"].default


@torch.no_grad()
def held_out_loss(model: Llama, corpus: Corpus, settings: Settings) -> float:
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in corpus.held_out_batches(settings.eval_tokens, settings.batch_size):
        inputs, targets = inputs.to(settings.device), targets.to(settings.device)
        total += model.loss(inputs, targets).item() * inputs.numel()
        count += inputs.numel()
    model.train()
    return total / count


def train(spec: RunSpec, corpus: Corpus, settings: Settings, run_dir: Path, stop_after: int | None = None):
    """Train ``spec`` to its budget, resuming from ``run_dir``'s checkpoint if there is one; the result is
    also written to ``run_dir/result.json``. ``stop_after`` ends the call early (after that many steps of
    this call, checkpointed): it stands in for an interrupted run in the tests."""
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(settings.device)
    torch.manual_seed(settings.seed)
    model = Llama(settings.config).to(device)
    opt = build_optimizer(model, spec, settings)
    steps = steps_for(spec, settings, model.non_embedding_parameters())
    base_lrs = [group["lr"] for group in opt.param_groups]
    result = RunResult(spec.name, asdict(spec), steps, steps * settings.batch_size * settings.config.seq_len)
    checkpoint = run_dir / "checkpoint.pt"
    start, running, counted = 0, 0.0, 0
    if checkpoint.exists():
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        result = RunResult(**saved["result"])
        start, running, counted = saved["step"], *saved["running"]
    eval_at = {round(steps * (i + 1) / settings.evals) for i in range(settings.evals)}
    begun = time.perf_counter()
    for step in range(start, steps):
        for group, lr in zip(opt.param_groups, base_lrs):
            group["lr"] = lr * lr_factor(spec.schedule, step, steps, settings.warmup, settings.decay)
        try:
            value, fwd_bwd, stepped = _training_step(model, opt, corpus, settings, step)
        except Diverged as error:
            result.diverged = f"{spec.optimizer}: {error} at step {step} of {steps} ({spec.name})"
            _write(run_dir, result)
            raise Diverged(result.diverged) from None
        result.fwd_bwd_seconds += fwd_bwd
        result.step_seconds += stepped
        running, counted = running + value, counted + 1
        done = step + 1
        if done in eval_at:
            result.train_curve.append([done, running / counted])
            running, counted = 0.0, 0
            seconds = result.fwd_bwd_seconds + result.step_seconds
            result.curve.append([done, done * settings.batch_size * settings.config.seq_len, seconds,
                                 held_out_loss(model, corpus, settings)])
        if settings.progress:
            _progress(spec.name, done, steps, value, start, begun)
        if done % settings.checkpoint_every == 0 or done == steps or (stop_after and done - start >= stop_after):
            if done < steps:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": done,
                            "running": (running, counted), "result": asdict(result)}, checkpoint)
            if stop_after and done - start >= stop_after and done < steps:
                return None
    if settings.progress and sys.stderr.isatty():
        print(file=sys.stderr, flush=True)
    result.final_loss = result.curve[-1][3] if result.curve else held_out_loss(model, corpus, settings)
    result.state_bytes = sum(tensor_bytes(state) for state in opt.state.values())
    _write(run_dir, result)
    checkpoint.unlink(missing_ok=True)
    return result


def _training_step(model: Llama, opt, corpus: Corpus, settings: Settings, step: int) -> tuple[float, float, float]:
    """One step on batch ``step``: (training loss, fwd+bwd seconds, seconds of clipping and ``opt.step()``)."""
    device = torch.device(settings.device)
    inputs, targets = (t.to(device) for t in corpus.batch(settings.seed, step, settings.batch_size))
    tic = _now(device)
    if hasattr(opt, "update_hessian") and step % settings.hessian_every == 0:
        _gauss_newton_bartlett(model, opt, inputs)
    loss = model.loss(inputs, targets)
    loss.backward()
    value = loss.item()
    mid = _now(device)
    if not math.isfinite(value):
        raise Diverged(f"training loss is {value}")
    torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return value, mid - tic, _now(device) - mid


def time_steps(spec: RunSpec, corpus: Corpus, settings: Settings, steps: int = 20, warmup: int = 5):
    """(fwd+bwd ms, optimizer-step ms) per step, medians over ``steps`` steps after ``warmup``: the step-time
    breakdown of one configuration (e.g. each backend) without training it to a budget."""
    torch.manual_seed(settings.seed)
    model = Llama(settings.config).to(settings.device)
    opt = build_optimizer(model, spec, settings)
    times = [_training_step(model, opt, corpus, settings, step)[1:] for step in range(warmup + steps)][warmup:]
    return tuple(1e3 * statistics.median(t[i] for t in times) for i in (0, 1))


def load_result(run_dir: Path) -> RunResult | None:
    path = run_dir / "result.json"
    return RunResult(**json.loads(path.read_text())) if path.exists() else None


def _write(run_dir: Path, result: RunResult) -> None:
    (run_dir / "result.json").write_text(json.dumps(asdict(result), indent=1))


def _gauss_newton_bartlett(model: Llama, opt, inputs) -> None:
    """Sophia's Hessian estimate: back-propagate the loss on labels sampled from the model's own logits."""
    logits = model(inputs)
    sampled = torch.distributions.Categorical(logits=logits.detach().float()).sample()
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(logits.flatten(0, 1).float(), sampled.flatten()).backward()
    opt.update_hessian()
    opt.zero_grad(set_to_none=True)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _progress(name: str, done: int, steps: int, loss: float, start: int, begun: float) -> None:
    """A progress line: on a terminal rewritten every 10 steps, in a log one line per tenth of the run."""
    tty = sys.stderr.isatty()
    if (tty and done % 10 and done != steps) or (not tty and done * 10 // steps == (done - 1) * 10 // steps):
        return
    elapsed = time.perf_counter() - begun
    rate = (done - start) / elapsed if elapsed > 0 else 0.0
    eta = (steps - done) / rate if rate else 0.0
    width = 24
    bar = "#" * (width * done // steps)
    line = f"{name:<32} [{bar:<{width}}] {done}/{steps} loss {loss:.3f} {rate:.1f} steps/s ETA {eta:4.0f}s"
    print("\r" + line if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
