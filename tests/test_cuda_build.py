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
    assert_fp8_kernels_convert_in_hardware_on_sm90(sass)


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


# an element-wise kernel with fp8 state (state type h: the codes as unsigned char) of any param dtype; its pass
FP8_KERNEL = re.compile(r"multi_tensor_kernelI(?:f|13__nv_bfloat16|6__half)hNS0_\d+\w+?OpELNS0_4PassE(\d)E")


def assert_fp8_kernels_convert_in_hardware_on_sm90(sass: str) -> None:
    """The element-wise kernels with fp8 state decode e4m3 with the conversion instruction on sm_90 (F2FP
    ...E4M3.UNPACK_B) and, in the update pass, encode with it (F2FP.SATFINITE.E4M3); on sm_80, which has neither,
    they take the software codec, whose integer work made the fp8 kernels instruction-bound on an H200 (README
    "On a GPU", session 4): a lost `__CUDA_ARCH__` guard would bring it back silently."""
    parts = re.split(r"\n\s*arch = (sm_\d+)", sass)
    checked = 0
    for arch, body in zip(parts[1::2], parts[2::2]):
        for function in re.split(r"\n\s+Function : ", body)[1:]:
            name = function.split("\n", 1)[0]
            kernel = re.search(FP8_KERNEL, name)
            if kernel is None:
                continue
            decodes = re.search(r"F2FP\.F16\.E4M3\.UNPACK_B", function) is not None
            encodes = re.search(r"F2FP\.SATFINITE\.E4M3", function) is not None
            update = kernel.group(1) == "2"
            assert (decodes, encodes) == ((True, update) if arch == "sm_90" else (False, False)), (arch, name)
            checked += 1
    assert checked == 2 * 3 * 9, checked  # 2 archs x 3 param dtypes x 9 kernels (5 update, 4 count/squares)

