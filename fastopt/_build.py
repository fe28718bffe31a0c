"""Build of the C++/CUDA extensions in csrc/, just in time (ninja) or ahead of time (setup.py).

Two extensions, so that the CPU kernels build on machines without nvcc:

* ``fastopt_cpu``: the op schemas (csrc/fastopt.cpp) and the CPU kernels, compiled for the
  host's vector ISA (AVX-512 or AVX2; at::vec only vectorises when CPU_CAPABILITY is set).
* ``fastopt_cuda``: the CUDA kernels for sm_80 and sm_90 (or TORCH_CUDA_ARCH_LIST).

JIT builds are cached under ``$FASTOPT_CACHE`` (default ``~/.cache/fastopt``) in a folder
keyed by a hash of the sources, flags, torch version and CUDA version, so a changed source or
toolchain rebuilds and an unchanged one loads in milliseconds.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
CUDA_ARCHS = ("8.0", "9.0")


def csrc_dir() -> Path:
    """csrc/ of a source checkout, or the copy setup.py installs as fastopt/csrc."""
    for candidate in (PACKAGE_DIR / "csrc", PACKAGE_DIR.parent / "csrc"):
        if (candidate / "fastopt.cpp").is_file():
            return candidate
    raise FileNotFoundError("fastopt's C++ sources (csrc/) are not installed")


def cpu_sources() -> list[str]:
    root = csrc_dir()
    return [str(root / "fastopt.cpp"), *sorted(glob.glob(str(root / "cpu" / "*.cpp")))]


def cuda_sources() -> list[str]:
    return sorted(glob.glob(str(csrc_dir() / "cuda" / "*.cu")))


CPU_ISAS = ("AVX512", "AVX2", "DEFAULT")


def host_vector_isa() -> str:
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        flags = Path("/proc/cpuinfo").read_text()
    if "avx512f" in flags and "avx512bw" in flags and "avx512vl" in flags and "avx512dq" in flags:
        return "AVX512"
    if "avx2" in flags and "fma" in flags:
        return "AVX2"
    return "DEFAULT"


def cpu_cflags(isa: str, native: bool) -> list[str]:
    # -fopenmp: at::parallel_for is an OpenMP pragma; without it the kernels run on one thread
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    if isa == "AVX512":
        flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
    elif isa == "AVX2":
        flags += ["-mavx2", "-mfma", "-mf16c"]
    if isa != "DEFAULT":
        flags += [f"-DCPU_CAPABILITY={isa}", f"-DCPU_CAPABILITY_{isa}"]
    if native:
        flags.append("-march=native")
    return flags


def cuda_home() -> str | None:
    """The toolkit root: CUDA_HOME / CUDA_PATH, /usr/local/cuda, or above the real nvcc's bin/
    (nvcc on PATH may be a wrapper script, so the root is looked for, not derived from PATH)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for home in filter(None, candidates):
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.isdir(os.path.join(home, "lib64")):
            return home
    return None


def point_torch_at_cuda_home() -> str | None:
    """Make torch's cpp_extension use cuda_home(): it guesses from PATH at import time, which a
    wrapper script for nvcc (as on this machine) fools into linking against the wrong lib/."""
    from torch.utils import cpp_extension

    home = cuda_home()
    if home is not None:
        cpp_extension.CUDA_HOME = home
    return home


def cuda_include_dirs() -> list[str]:
    """Headers of the nvidia-* wheels (cuBLAS, CCCL, ...) that a pip-installed torch relies on."""
    dirs = []
    for entry in sys.path:
        dirs += glob.glob(os.path.join(entry, "nvidia", "*", "include"))
        dirs += glob.glob(os.path.join(entry, "nvidia", "cu*", "include"))
    return sorted(set(dirs))


def cuda_link_flags() -> list[str]:
    """Linker flags for cuBLAS (the symmetric products call cublasSsyrk): the library of the nvidia-cublas wheel a
    pip-installed torch loads, else the toolkit's."""
    for entry in [*sys.path, os.path.join(cuda_home() or "", "lib64")]:
        for pattern in (os.path.join(entry, "nvidia", "*", "lib", "libcublas.so*"),
                        os.path.join(entry, "libcublas.so*")):
            for library in sorted(glob.glob(pattern)):
                if os.path.basename(library).split(".so")[-1].count(".") <= 1:  # libcublas.so or .so.N
                    return [f"-L{os.path.dirname(library)}", f"-l:{os.path.basename(library)}"]
    return ["-lcublas"]


def cuda_archs() -> list[str]:
    """The GPU architectures the CUDA extension is built for: TORCH_CUDA_ARCH_LIST, else sm_80 and sm_90."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", ";".join(CUDA_ARCHS)).replace(" ", ";").split(";")
    return ["sm_" + arch.replace(".", "").replace("+PTX", "") for arch in archs if arch]


def cuda_flags() -> list[str]:
    gencode = [f"-gencode=arch=compute_{sm[3:]},code={sm}" for sm in cuda_archs()]
    return ["-O3", "--expt-relaxed-constexpr", *gencode]


def _cache_key(name: str, sources: list[str], flags: list[str]) -> str:
    h = hashlib.sha256()
    for src in sources + sorted(glob.glob(str(csrc_dir() / "*" / "*.h"))):
        h.update(Path(src).read_bytes())
    h.update(repr((flags, torch.__version__, torch.version.cuda, sys.version_info[:2])).encode())
    return f"{name}-{h.hexdigest()[:16]}"


def _cache_root() -> Path:
    return Path(os.environ.get("FASTOPT_CACHE", Path.home() / ".cache" / "fastopt"))


def _load_prebuilt(name: str) -> bool:
    """Load an extension that setup.py built ahead of time (FASTOPT_BUILD_EXT=1)."""
    spec = importlib.util.find_spec(f"fastopt.{name}")
    if spec is None or not isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
        return False
    torch.ops.load_library(spec.origin)
    return True


def _jit_load(prefix: str, sources: list[str], flags: list[str], verbose: bool, **options) -> None:
    """Build with ninja into the cache folder of (sources, flags, versions), or load what is there."""
    from torch.utils import cpp_extension

    name = _cache_key(prefix, sources, flags)
    build_dir = _cache_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name=name.replace("-", "_"), sources=sources, build_directory=str(build_dir),
                       is_python_module=False, verbose=verbose, **options)


def build_cpu(verbose: bool = False) -> str:
    """Build (or load from cache) the CPU extension; returns a description of what was loaded."""
    if _load_prebuilt("fastopt_cpu"):
        return "prebuilt"
    # FASTOPT_CPU_ISA builds for that ISA and no other (as the ahead-of-time build does for AVX2), so that its code
    # paths can be run on a host that has more
    forced = os.environ.get("FASTOPT_CPU_ISA")
    if forced is not None and forced not in CPU_ISAS:
        raise ValueError(f"FASTOPT_CPU_ISA={forced!r}: expected one of {', '.join(CPU_ISAS)}")
    isa = forced or host_vector_isa()
    flags = cpu_cflags(isa, native=forced is None)
    _jit_load("fastopt_cpu", cpu_sources(), flags, verbose, extra_cflags=flags, extra_ldflags=["-fopenmp"],
              extra_include_paths=[str(csrc_dir())])
    return f"jit {isa}"


def cuda_build_status() -> str:
    """Whether the CUDA extension is built (ahead of time, or in the JIT cache) and for which archs."""
    archs = ", ".join(cuda_archs())
    if importlib.util.find_spec("fastopt.fastopt_cuda") is not None:
        return f"prebuilt (FASTOPT_BUILD_EXT=1), {archs}"
    built = list((_cache_root() / _cache_key("fastopt_cuda", cuda_sources(), cuda_flags())).glob("*.so"))
    return f"built in the cache for {archs}" if built else f"not built yet; builds on first use for {archs}"


def build_cuda(verbose: bool = False) -> str:
    """Build (or load from cache) the CUDA extension (needs the CPU one loaded for the schemas)."""
    if _load_prebuilt("fastopt_cuda"):
        return "prebuilt"
    if torch.version.cuda is None:
        raise RuntimeError("this torch is a CPU-only build; install a CUDA build of torch for the cuda backend")
    if point_torch_at_cuda_home() is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME to the CUDA toolkit root)")
    flags = cuda_flags()
    _jit_load("fastopt_cuda", cuda_sources(), flags, verbose, extra_cflags=["-O3"], extra_cuda_cflags=flags,
              extra_include_paths=[str(csrc_dir()), *cuda_include_dirs()], extra_ldflags=cuda_link_flags(),
              with_cuda=True)
    return "jit " + ", ".join(cuda_archs())
