"""fastopt's build. ``pip install .`` compiles nothing: the C++/CUDA kernels build on first
use (fastopt/_build.py). ``FASTOPT_BUILD_EXT=1 pip install .`` builds them ahead of time:
the CPU extension for AVX2 (portable; the JIT build targets the host's AVX-512), and the
CUDA extension for sm_80 and sm_90 when nvcc is found."""

import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastopt"))

PACKAGES = ["fastopt", "fastopt.optim", "fastopt.reference", "fastopt.ops", "fastopt.triton_kernels",
            "fastopt.csrc", "fastopt.benchmarks"]
PACKAGE_DIR = {"fastopt.triton_kernels": "triton_kernels", "fastopt.csrc": "csrc",
               "fastopt.benchmarks": "benchmarks"}
PACKAGE_DATA = {"fastopt.csrc": ["*.cpp", "common/*.h", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu"],
                "fastopt.benchmarks": ["data/*"]}


def extensions():
    if os.environ.get("FASTOPT_BUILD_EXT", "0") != "1":
        return [], {}
    import _build  # fastopt/_build.py, imported without importing fastopt
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpu = CppExtension("fastopt.fastopt_cpu", [os.path.relpath(s) for s in _build.cpu_sources()],
                       include_dirs=[str(_build.csrc_dir())],
                       extra_compile_args=_build.cpu_cflags("AVX2", native=False), extra_link_args=["-fopenmp"])
    exts = [cpu]
    if _build.point_torch_at_cuda_home():
        exts.append(CUDAExtension("fastopt.fastopt_cuda", [os.path.relpath(s) for s in _build.cuda_sources()],
                                  include_dirs=[str(_build.csrc_dir()), *_build.cuda_include_dirs()],
                                  extra_compile_args={"cxx": ["-O3"], "nvcc": _build.cuda_flags()},
                                  extra_link_args=_build.cuda_link_flags()))
    return exts, {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()

setup(
    name="fastopt",
    version="0.1.0",
    description="Fused-kernel drop-in torch.optim replacements for LLM pretraining",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data=PACKAGE_DATA,
    install_requires=["torch>=2.6", "ninja"],
    extras_require={"test": ["pytest", "pytest-benchmark", "numpy", "lion-pytorch"], "triton": ["triton"],
                    # peers timed side by side by `python -m fastopt bench step`; never runtime dependencies
                    "bench": ["lion-pytorch", "pytorch-optimizer", "timm", "heavyball", "matplotlib"]},
    entry_points={"console_scripts": ["fastopt=fastopt.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
