"""Building tokenmill's C++ kernels (attention/cpu_backend.py, qkernels.py, cpu_decoder.py) at first use with
torch.utils.cpp_extension, for the instruction sets this CPU lists.

Never -march=native: a VM may list AMX (and other) flags its OS does not enable, and a binary
built for them dies with SIGILL. The kernels ask for the sets they use, named one by one from
/proc/cpuinfo; AMX only as a define (isa_flags), its code guarded at run time. A build's
cache entry is keyed by its source and flags, so a shared home directory or image never hands
an AVX-512 build to another CPU.

A start with a build already made skips torch's load_inline altogether: importing
torch.utils.cpp_extension (setuptools) and its ninja run cost about 0.4 s a kernel even when
nothing is compiled. After a build has loaded once, its .so is copied to a cache of our own
(`kernel_cache_dir()`), named by the source+flags digest, the torch version and the Python
ABI; a later start imports that file directly. A copy whose content is not what was stored
(its sha256 is kept beside it), or that does not import, is deleted and the start takes the load_inline path,
which rebuilds where needed: the cache can cost time, never a crash.

`python -m tokenmill.model.cpp_build` builds every kernel now (scripts/install.sh runs it)
so that a fresh install's first start does not wait on the compiler."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
import time

from tokenmill.files import write_atomic
from tokenmill.startup import phase

log = logging.getLogger("tokenmill")

# /proc/cpuinfo flag -> compiler flag. AMX is never one of them (module docstring; isa_flags).
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
    kernels' AVX2 paths need both). AMX-INT8 listed only defines TM_AMX_LISTED: qkernels then
    compiles its tile code in functions of their own target and runs it only where the OS
    grants the tile state, never enabling AMX for the whole build."""
    have = set(flags.split())
    out = [f for name, f in _ISA_FLAGS.items() if name in have]
    if not {"avx2", "fma"} <= have:
        out = [f for f in out if f not in ("-mavx2", "-mfma")]
    if {"amx_tile", "amx_int8"} <= have:
        out.append("-DTM_AMX_LISTED")
    return out


def digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def module_name(prefix: str, source: str, cflags: list[str]) -> tuple[str, list[str]]:
    """The module's name, keyed by the source and every compiler flag, and those flags."""
    flags = [*cflags, *isa_flags(cpu_flags())]
    return f"{prefix}_{digest(source + ' '.join(flags))}", flags


def kernel_cache_dir() -> str:
    """Where built kernels are kept for direct import: beside torch's own extension builds
    ($TORCH_EXTENSIONS_DIR, else the user cache), so whoever clears one clears both."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch_extensions")
    return os.path.join(root, "tokenmill-kernels")


def cached_path(name: str) -> str:
    """The cache file of the module `name` (which already holds the source+flags digest) for
    this torch and this Python: another torch's build is never imported."""
    import torch

    return os.path.join(kernel_cache_dir(), f"{name}.torch-{torch.__version__}.{sys.implementation.cache_tag}.so")


def build(prefix: str, source: str, functions: list[str], cflags: list[str]):
    """The compiled module: imported from the kernel cache where this build is there, else
    built (g++ and ninja; raises where it cannot be built) and added to the cache."""
    name, flags = module_name(prefix, source, cflags)
    path = cached_path(name)
    if os.path.exists(path):
        with phase(f"kernel {prefix} loaded from cache"):
            module = import_cached(name, path, functions)
        if module is not None:
            return module
    with phase(f"kernel {prefix} built or loaded by torch"):
        module = _load_inline(name, source, functions, flags)
    _store(module, path)
    return module


def import_cached(name: str, path: str, functions: list[str]):
    """The module in the cache file, or None (and the entry deleted) where the file is not the
    one stored (its sha256 is kept beside it: dlopen of a truncated or garbled library can
    kill the process with SIGBUS instead of raising), does not import, or lacks a function."""
    try:
        with open(path, "rb") as f:
            content = f.read()
        with open(path + ".sha256") as f:
            if hashlib.sha256(content).hexdigest() != f.read().strip():
                raise ImportError("its content is not the build that was stored")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        missing = [f for f in functions if not hasattr(module, f)]
        if missing:
            raise ImportError(f"no {', '.join(missing)} in it")
        return module
    except Exception as e:  # ImportError, OSError (no sidecar, bad ELF), anything dlopen says
        log.warning("kernel cache %s is unusable (%s): rebuilding", path, str(e).splitlines()[0] if str(e) else e)
        for stale in (path, path + ".sha256"):
            try:
                os.remove(stale)
            except OSError:
                pass
        return None


def _load_inline(name: str, source: str, functions: list[str], flags: list[str]):
    from torch.utils.cpp_extension import _get_build_directory, load_inline

    lock = os.path.join(_get_build_directory(name, False), "lock")
    if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > 600:
        os.remove(lock)  # left by a build that was killed: torch would wait on it forever
    return load_inline(name=name, cpp_sources=source, functions=functions, extra_cflags=flags,
                       extra_ldflags=["-fopenmp"])


def _store(module, path: str) -> None:
    """Copy the loaded build into the cache with its sha256 beside it; each file atomically (a
    concurrent start sees an old, a new or a mismatched pair, never half a file, and a
    mismatch only sends it to rebuild), and only at a cost of speed where the cache cannot be
    written."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(module.__file__, "rb") as f:
            content = f.read()
        write_atomic(path, content)
        write_atomic(path + ".sha256", hashlib.sha256(content).hexdigest())
    except OSError as e:
        log.info("kernel cache not written (%s): the next start loads through torch", e)


def main() -> int:
    """Build (or find) every C++ kernel for this CPU now: `python -m tokenmill.model.cpp_build`."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from tokenmill.model import cpu_decoder, qkernels
    from tokenmill.model.attention import cpu_backend

    built = {"quantized linear": qkernels.kernel() is not None, "CPU attention": cpu_backend.kernel() is not None,
             "CPU decoder": cpu_decoder.kernel() is not None}
    for what, ok in built.items():
        print(f"{what} kernel: {'ready' if ok else 'NOT built (the torch fallback will run)'}; cache {kernel_cache_dir()}")
    return 0 if all(built.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
