"""Start-up phase timings, one INFO line each ("startup: gguf read 0.41 s"), so an operator
sees where a slow start goes (an autoscaler adds replicas at exactly that moment).

Used from every layer that has a phase (model loading, kernel loading, engine wiring, the
server), so it imports nothing of tokenmill."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("tokenmill")


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Log how long the block took; a block that raises logs nothing (its error says enough)."""
    start = time.perf_counter()
    yield
    log.info("startup: %s %.2f s", name, time.perf_counter() - start)


def since_process_start() -> float | None:
    """Seconds since this process was created (interpreter start and imports included), from
    /proc; None where /proc is not there."""
    try:
        with open("/proc/self/stat") as f:
            # Field 22 (starttime, clock ticks after boot); the name (field 2) may hold spaces.
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def log_since_process_start(what: str) -> None:
    elapsed = since_process_start()
    if elapsed is not None:
        log.info("startup: %s %.2f s after process start", what, elapsed)
