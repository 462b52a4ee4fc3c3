"""A CPU model's quantized kernel weights in one mapping on transparent huge pages.

Why: a decode step reads every weight once, 92 MiB for the default model, in a few hundred
buffers of 30 KB to 28 MB. On 4 KiB pages that is about 23,000 pages a step, each one a TLB
miss and a page walk whose tables the weights themselves have pushed out of the caches; the
hardware prefetchers also stop at each 4 KiB boundary. On 2 MiB pages the same bytes are
about 46 pages. Measured on the default model at one row, forward and LM head, paired in one
process (benchmarks/weight_arena_ab.py): 1.17x and 1.13x; at 16 rows, which are compute-bound,
1.00-1.03x (docs/benchmarks.md).

The kernels' buffers are copied once, at model build, in the order a step reads them (layer by
layer, the LM head last), each 64-byte aligned, into one anonymous private mapping aligned to
2 MiB and advised MADV_HUGEPAGE; the modules then hold views of it and the old buffers are
freed (and their heap pages handed back). The values are the same bytes. Faulting the 46
pages in costs 8 ms where the process had just freed huge pages, and about 0.25 s of the start
on this VM for memory it had not touched since boot (its host backs memory at first touch).
Where the kernel grants no huge pages (THP "never", or no 2 MiB page free) the mapping is
plain pages and nothing else changes.
"""

from __future__ import annotations

import ctypes
import mmap

import torch
from torch import nn

HUGE_PAGE = 2 << 20
ALIGN = 64  # a cache line: every buffer starts on one, as torch's allocator gives them
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux's value; Python 3.11 lacks the name


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def arena(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of `nbytes`, starting on a 2 MiB boundary of an anonymous private
    mapping advised MADV_HUGEPAGE (where the platform has the advice), its pages faulted in
    (zeroed) at once where the kernel can. The tensor keeps the mapping alive."""
    # MAP_PRIVATE: Python's default for an anonymous map is MAP_SHARED (shmem), which THP's
    # "madvise" mode does not cover, and which a forked child would write through to.
    # Room to start on a 2 MiB boundary and to end on one: the last huge page is whole.
    mm = mmap.mmap(-1, nbytes + 2 * HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(mm, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE
    pages = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    try:
        mm.madvise(mmap.MADV_HUGEPAGE, start, pages)
    except (AttributeError, OSError):  # not Linux, or a kernel without THP: plain pages
        pass
    try:
        # Fault every page in now, in one call: 8 ms for 92 MiB of huge pages, where the copy's
        # first touches, a fault each, took 120-140 ms (a VM's faults are dear).
        mm.madvise(MADV_POPULATE_WRITE, start, pages)
    except OSError:  # before Linux 5.14: the copy faults them in
        pass
    return whole[start : start + nbytes]


def _kernel_buffers(model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(module, name, tensor) of every quantized kernel buffer on the CPU, in module order."""
    from tokenmill.model.quant import Int4Linear, Int8Linear

    names = {Int4Linear: ("packed", "scale", "minimum"), Int8Linear: ("qweight", "scales")}
    found = []
    for module in model.modules():
        for name in names.get(type(module), ()):
            t = getattr(module, name, None)
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel() and t.is_contiguous():
                found.append((module, name, t))
    return found


def gather(model: nn.Module) -> torch.Tensor | None:
    """Move `model`'s quantized kernel buffers into one huge-page arena (module docstring);
    returns the arena (None: no such buffers, nothing moved). Call before anything else
    holds the buffers (the C++ decoder's registration), or the old ones stay alive there."""
    found = _kernel_buffers(model)
    if not found:
        return None
    total = sum(_aligned(t.numel() * t.element_size()) for _, _, t in found)
    space = arena(total)
    offset = 0
    for module, name, t in found:
        n = t.numel() * t.element_size()
        view = space[offset : offset + n].view(t.dtype).view(t.shape)
        view.copy_(t)
        setattr(module, name, view)  # a registered buffer: stays one, persistent as it was
        offset += _aligned(n)
    del found, t
    _trim_heap()
    return space


def _trim_heap() -> None:
    """Hand the freed buffers' pages back to the OS: glibc keeps freed heap memory for reuse,
    which left the old copies' 75 MiB resident after the move."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator decides
        pass


def huge_page_bytes(t: torch.Tensor) -> int | None:
    """Bytes of the mapping holding `t` that sit on huge pages (/proc/self/smaps' AnonHugePages),
    or None where that cannot be read."""
    addr = t.data_ptr()
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    inside = lo <= addr < hi
                elif inside and head == "AnonHugePages:":
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None
