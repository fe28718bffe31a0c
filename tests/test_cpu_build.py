"""The CPU kernels compile for every vector ISA _build targets, not only the host's: the tests run the
host's build (AVX-512 here), while `FASTOPT_BUILD_EXT=1 pip install` builds AVX2 and a CPU without AVX2
builds the plain at::vec fallback. The files with ISA-specific code (the fp8 codecs) are compiled to
object code for AVX2 (an intrinsic outside its target fails only then) and type-checked for DEFAULT, and
the backend tests run on an AVX2 and a DEFAULT build of the extension too (FASTOPT_CPU_ISA)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from fastopt import _build

SOURCES = ["elementwise_step.cpp", "matrix_elementwise.cpp", "philox_normal.cpp"]


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


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["AVX2", "DEFAULT"])
def test_cpu_backend_tests_pass_on_each_isa_build(isa):
    """The cpu backend's tests of test_backends.py (every element-wise rule against the reference, over param and
    state dtypes, and the fp8 codecs bit for bit), test_muon.py (the orthogonalized optimizers' passes) and
    test_noise.py (Kron's noise kernel) on the extension built for `isa` alone (FASTOPT_CPU_ISA), in a subprocess:
    the AVX2 decoder and absmax, the scalar encoder the lagged fp8 encoder falls back to, and the scalar Philox run
    nowhere else on an AVX-512 host."""
    if isa == "AVX2" and _build.host_vector_isa() == "DEFAULT":
        pytest.skip("this CPU has no AVX2")
    tests = [str(Path(__file__).parent / name) for name in ("test_backends.py", "test_muon.py", "test_noise.py")]
    env = {**os.environ, "FASTOPT_CPU_ISA": isa}
    info = subprocess.run([sys.executable, "-m", "fastopt", "info"], env=env, capture_output=True, text=True)
    assert f"jit {isa})" in info.stdout, info.stdout[-2000:] + info.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, "-k",
                          "cpu and not triton and not gpu and not interpreter"], env=env, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout, run.stdout[-1000:]
