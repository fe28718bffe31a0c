"""Selection: ROOT's quantile soft-threshold (fastopt.ops.clamp_to_quantile, q = 0.9) per backend, in GB/s
counted as a perfect kernel's bytes (read x once, write the clamped matrix once) and as a fraction of the
same-run bandwidth."""

from __future__ import annotations

import pytest
import torch

from fastopt import ops

from .micro import DEVICE, bandwidth_figures, measure, nbytes, skip_unless_runs

SHAPES = ((768, 768), (768, 3072), (8, 768, 3072))  # the last: a ROOT stack of same-shape matrices


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "cuda"])
@pytest.mark.parametrize("with_norm", [False, True], ids=["clamp", "clamp+norm"])
def test_clamp_to_quantile(benchmark, bandwidth, backend, shape, with_norm):
    skip_unless_runs(backend)
    x = torch.randn(shape, device=DEVICE)
    times = measure(benchmark, {"clamp_to_quantile": lambda: ops.clamp_to_quantile(x, 0.9, backend=backend,
                                                                                   with_norm=with_norm)})
    bandwidth.sample()
    benchmark.extra_info.update(bandwidth_figures(times["clamp_to_quantile"], 2 * nbytes(x), bandwidth.best))
