"""The CPU kernels compile for every vector ISA _build targets, not only the host's: the tests run the
host's build (AVX-512 here), while `FASTOPT_BUILD_EXT=1 pip install` builds AVX2 and a CPU without AVX2
builds the plain at::vec fallback. The files with ISA-specific code (the fp8 codecs) are compiled to
object code for AVX2 (an intrinsic outside its target fails only then) and type-checked for DEFAULT."""

import shutil
import subprocess

import pytest
from torch.utils import cpp_extension

from fastopt import _build

SOURCES = ["elementwise_step.cpp", "matrix_elementwise.cpp"]


@pytest.mark.slow
@pytest.mark.parametrize("isa, mode", [("AVX2", ["-c", "-O0", "-o", "/dev/null"]), ("DEFAULT", ["-fsyntax-only"])])
@pytest.mark.parametrize("source", SOURCES)
def test_cpu_kernels_compile_for_each_isa(isa, mode, source):
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    command = [compiler, "-std=c++20", *mode, *_build.cpu_cflags(isa, native=False), f"-I{_build.csrc_dir()}",
               *[f"-isystem{path}" for path in cpp_extension.include_paths()], str(_build.csrc_dir() / "cpu" / source)]
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
