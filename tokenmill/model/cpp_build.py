"""Building tokenmill's C++ kernels (attention/cpu_backend.py, qkernels.py) at first use with
torch.utils.cpp_extension, for the instruction sets this CPU lists.

Never -march=native: a VM may list AMX (and other) flags its OS does not enable, and a binary
built for them dies with SIGILL. The kernels ask for the sets they use, named one by one from
/proc/cpuinfo. A build's cache entry is keyed by its source and flags, so a shared home
directory or image never hands an AVX-512 build to another CPU."""

from __future__ import annotations

import hashlib
import os
import time

# /proc/cpuinfo flag -> compiler flag. AMX is left out on purpose (module docstring).
_ISA_FLAGS = {
    "avx2": "-mavx2", "fma": "-mfma", "f16c": "-mf16c",
    "avx512f": "-mavx512f", "avx512bw": "-mavx512bw", "avx512vl": "-mavx512vl", "avx512_vnni": "-mavx512vnni",
}


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def isa_flags(flags: str) -> list[str]:
    """Compiler flags for the instruction sets /proc/cpuinfo lists; AVX2 only with FMA (the
    kernels' AVX2 paths need both)."""
    have = set(flags.split())
    out = [f for name, f in _ISA_FLAGS.items() if name in have]
    if not {"avx2", "fma"} <= have:
        out = [f for f in out if f not in ("-mavx2", "-mfma")]
    return out


def digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def build(prefix: str, source: str, functions: list[str], cflags: list[str]):
    """The compiled module (g++ and ninja; raises where it cannot be built)."""
    from torch.utils.cpp_extension import _get_build_directory, load_inline

    flags = [*cflags, *isa_flags(cpu_flags())]
    name = f"{prefix}_{digest(source + ' '.join(flags))}"
    lock = os.path.join(_get_build_directory(name, False), "lock")
    if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > 600:
        os.remove(lock)  # left by a build that was killed: torch would wait on it forever
    return load_inline(name=name, cpp_sources=source, functions=functions, extra_cflags=flags,
                       extra_ldflags=["-fopenmp"])
