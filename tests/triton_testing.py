"""Helpers of the Triton kernel tests: private interpreted / compiled copies of a kernel module, and compile checks.

Why private copies: see the docstring of tests/test_triton_elementwise_step.py.
"""
import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton


@functools.lru_cache(maxsize=None)
def kernel_module(kernel: str, interpret: bool, **test_kernels):
    """A private copy of fastopt.triton_kernels.<kernel>, decorated with TRITON_INTERPRET=1 or 0; the interpreted copy
    also gets ``test_kernels`` (attribute name: Python function), jitted in it."""
    path = Path(__file__).resolve().parents[1] / "triton_kernels" / f"{kernel}.py"
    if not path.exists():  # testing an installed package without the source tree
        path = Path(importlib.util.find_spec(f"fastopt.triton_kernels.{kernel}").origin)
    mode = "interpreted" if interpret else "compiled"
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        spec = importlib.util.spec_from_file_location(f"_fastopt_{kernel}_{mode}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if interpret:
            for attr, fn in test_kernels.items():
                setattr(module, attr, triton.jit(fn))
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    return module


def compile_check(module, name, arch, **options):
    """Compile the spec ``name`` of ``module.compile_specs()`` for sm_<arch> (its own attrs and options where it has
    them, else ``options``); run ptxas -v (the one Triton uses) on its PTX. Returns the PTX, the cubin's size, the
    shared memory and the ptxas log."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    _, fn, signature, constexprs, *rest = next(s for s in module.compile_specs() if s[0] == name)
    attrs, options = rest or (None, options)
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    gpu = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"{name}.ptx"
        src.write_text(ptx)
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", str(src), "-o", str(src) + ".o"],
                             capture_output=True, text=True, check=True)
    return {"ptx": ptx, "cubin": len(compiled.asm["cubin"]), "shared": compiled.metadata.shared,
            "ptxas": log.stdout + log.stderr}


@functools.lru_cache(maxsize=None)
def compile_checks_in_subprocess(kernel, **options):
    """compile_check of every spec of kernel_module(kernel, False) for sm_80 and sm_90, by "<spec>-<arch>", in a fresh
    process without TRITON_INTERPRET (for when triton's standard library was decorated in interpreter mode)."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import triton_testing as t; "
            "k, o = t.kernel_module(sys.argv[2], False), json.loads(sys.argv[3]); "
            "print(json.dumps({f'{s[0]}-{a}': t.compile_check(k, s[0], a, **o) for s in k.compile_specs() "
            "for a in (80, 90)}))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), kernel, json.dumps(options)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
