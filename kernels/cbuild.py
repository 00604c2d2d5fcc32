"""Build and load the C kernels of the CPU paths (kernels/mxfp4_cpu.py, the activation in kernels/moe.py).

What: `load(name, source, variants)` compiles `source` with the system C compiler (`$CC`, default `cc`,
the one Triton already needs) into a shared library, caches it under ~/.cache/deliberate (or
$DELIBERATE_KERNEL_CACHE) keyed by source, compiler, flags and the CPU's feature flags (-march=native
binaries are per CPU), and loads it with ctypes (whose calls release the GIL). `variants` are complete
flag lists tried in order (e.g. with glibc's libmvec first, without it second); `native_flags()` is the
common start of one, and `openmp_flags()` gives -fopenmp where the library can share torch's OpenMP
threads. When no variant builds, a warning names the compiler's error and `load` returns None: the
caller falls back to its torch path.

Why not torch.utils.cpp_extension (`load_inline` / `load`), measured on the 2-core box (torch 2.13,
gcc 12.2; both kernels at their first flag list; cold = empty cache, warm = a new process finding it):

                                   cold build (moe / mxfp4)     warm load, per process
    cbuild (this module)           0.3-0.5 s / 1.1 s            0.005 s (hash, stat, dlopen)
    cpp_extension.load(x.c)        0.8-1.4 s / does not build   0.27 s (writes build.ninja, runs ninja)
    cpp_extension.load_inline      76 s (moe)                   0.28 s

- `load_inline` prepends `#include <torch/extension.h>`: compiling the torch headers is the 76 s.
- Both build a torch extension: every source is compiled as C++ (`c++ -std=c++20`; our `-std=c11` is
  ignored) and linked against libtorch. mxfp4_cpu's C is not valid C++, and the MoE kernel's symbols
  come out mangled (`_Z14swiglu_fwd_f32PKfS0_Pflllff`), so ctypes would not find them without
  `extern "C"` rewrites. We want a plain C library with no torch ABI to match.
- The warm cost is paid by every process that touches a kernel (learner, each Ray rollout actor,
  every test process).
- Its cache is keyed by extension name and an in-process version counter, not by CPU: a home folder
  shared by nodes with different CPUs would hand one node another's -march=native binary (SIGILL).
  Flag fallbacks (libmvec / OpenMP may be missing) would rebuild into one shared build folder, and it
  needs the ninja binary, which torch does not depend on.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import warnings
from pathlib import Path

import torch


def native_flags() -> list[str]:
    """-O3 for this CPU, as a shared library; 512-bit vectors on x86 (gcc defaults to 256)."""
    flags = ["-O3", "-march=native", "-shared", "-fPIC"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-mprefer-vector-width=512")
    return flags


def openmp_flags() -> list[str]:
    """["-fopenmp"] when torch's parallel backend is GNU OpenMP and its libgomp is loaded: a library built
    with gcc -fopenmp then binds to that same libgomp.so.1 and runs on torch's own threads. [] otherwise
    (another runtime would start a second pool competing with torch's for the cores)."""
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return []
    try:
        with open("/proc/self/maps") as f:
            return ["-fopenmp"] if any("libgomp" in line for line in f) else []
    except OSError:
        return []


def cpu_fingerprint() -> str:
    """The CPU's feature-flag line (/proc/cpuinfo), else the machine name."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.machine())
    except OSError:
        return platform.machine()


def cache_dir() -> Path:
    return Path(os.environ.get("DELIBERATE_KERNEL_CACHE", Path.home() / ".cache" / "deliberate"))


def load(name: str, source: str, variants: list[list[str]]) -> ctypes.CDLL | None:
    """The library built from `source` with the first flag list of `variants` that compiles, or None.

    Flags starting with -l go after the source file, where the linker wants libraries."""
    compiler = os.environ.get("CC", "cc")
    cache, cpu = cache_dir(), cpu_fingerprint()
    errors = []
    for flags in variants:
        key = hashlib.sha256("\0".join([source, compiler, *flags, cpu]).encode()).hexdigest()[:16]
        lib_path = cache / f"{name}_{key}.so"
        try:
            if not lib_path.exists():
                cache.mkdir(parents=True, exist_ok=True)
                src = cache / f"{name}_{key}.{os.getpid()}.c"
                src.write_text(source)
                tmp = src.with_suffix(".so")
                libs = [f for f in flags if f.startswith("-l")]
                opts = [f for f in flags if not f.startswith("-l")]
                try:
                    subprocess.run([compiler, *opts, str(src), "-o", str(tmp), *libs], check=True,
                                   capture_output=True, text=True)
                    os.replace(tmp, lib_path)  # atomic: concurrent builders race harmlessly
                finally:
                    src.unlink(missing_ok=True)
                    tmp.unlink(missing_ok=True)
            return ctypes.CDLL(str(lib_path))
        except (OSError, subprocess.CalledProcessError) as err:
            errors.append(f"{' '.join(flags)}: {getattr(err, 'stderr', '') or err}")
    warnings.warn(f"{name}: C kernels not built with {compiler} ({errors[-1] if errors else 'no flag lists'}); "
                  "using the torch path")
    return None
