"""What the benchmark commands share: their device, rounds and --json options, the JSON file, and
timing one call on a device."""

from __future__ import annotations

import argparse
import json
import time

import torch


def timed(fn, device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def add_common_arguments(parser: argparse.ArgumentParser, rounds: int) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--json", help="write the results to this file")


def write_json(path: str | None, results) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
