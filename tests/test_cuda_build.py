"""csrc/ compiles for sm_80 and sm_90 against the CUDA build of torch, without a GPU, and the
CUDA kernels register; the cubins use no local memory (no register spills), and the element-wise
engine's update kernels write through wide (8- or 16-byte) stores."""

import glob
import os
import re
import subprocess

import pytest
import torch

from fastopt import _build, backends
from fastopt.ops import CUDA_OPS, NATIVE_OPS


def _cuobjdump() -> str | None:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else None


@pytest.mark.slow
def test_cuda_extension_builds_for_sm80_and_sm90():
    if torch.version.cuda is None or _build.cuda_home() is None:
        pytest.skip("needs the CUDA build of torch and nvcc")
    assert backends.probe("cpu").available  # the schemas
    _build.build_cuda()
    for op in NATIVE_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastopt::{op}", "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastopt::{op}", "CPU"), op
    for op in CUDA_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastopt::{op}", "CUDA"), op

    library = max(glob.glob(os.path.join(_build._cache_root(), "fastopt_cuda-*", "*.so")), key=os.path.getmtime)
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump to read the cubins")
    usage = subprocess.run([tool, "--dump-resource-usage", library], capture_output=True, text=True,
                           check=True).stdout
    archs = set(re.findall(r"arch = (sm_\d+)", usage))
    assert {"sm_80", "sm_90"} <= archs, usage[:500]
    kernels = re.findall(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    assert kernels, usage[:500]
    assert all(stack == "0" and local == "0" for _, stack, local in kernels), "register spills to local memory"
    sass = subprocess.run([tool, "--dump-sass", library], capture_output=True, text=True, check=True).stdout
    assert_update_kernels_store_wide(sass)


# The states each rule's update pass writes (csrc/cuda/elementwise_step.cu: Op::writes).
WRITTEN_STATES = {"AdamOp": 3, "LionOp": 1, "MarsOp": 4, "SophiaOp": 1, "AdamMiniOp": 1}


def assert_update_kernels_store_wide(sass: str) -> None:
    """Each update-pass kernel of the element-wise engine stores at least one 8- or 16-byte word per stream it
    writes (param, master weights, each written state) on its vector path. A Pack stored as a struct was once
    compiled into one store per element (bf16 state: no wide store at all), and the AdamW step moved a third of
    the GPU's bandwidth (an H200, README "On a GPU")."""
    checked = 0
    for function in re.split(r"\n\s+Function : ", sass)[1:]:
        name = function.split("\n", 1)[0]
        rule = re.search(r"multi_tensor_kernelI.*?NS0_\d+(\w+?Op)ELNS0_4PassE2E", name)
        if rule is None:
            continue
        wide = len(re.findall(r"\bSTG\.E\.(?:128|64)\b", function))
        assert wide >= 2 + WRITTEN_STATES[rule.group(1)], (name, wide)
        checked += 1
    assert checked == 2 * 9 * len(WRITTEN_STATES), checked  # 2 archs x 9 (param, state) dtype pairs
