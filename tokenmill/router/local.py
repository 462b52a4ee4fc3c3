"""`tokenmill router --local N`: N `tokenmill serve` child processes on this machine, the CPU
threads split between them, restarted when they die (a one-box fleet)."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger("tokenmill.router")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: Linux sends it SIGTERM (its graceful drain) when the router
    dies, however it dies (SIGKILL included), so no replica outlives its supervisor."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


@dataclass
class Child:
    port: int
    threads: int
    proc: subprocess.Popen | None = None
    restarts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class LocalFleet:
    n: int
    serve_args: list[str] = field(default_factory=list)  # passed to every `tokenmill serve`
    threads: int | None = None  # in all; default: every CPU
    restart_delay_s: float = 1.0
    children: list[Child] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        if self.n < 1:
            raise ValueError("--local needs at least one replica")
        total = self.threads or os.cpu_count() or 1
        # Threads split evenly; oversubscribing cores makes every replica slower than fewer would.
        self.children = [Child(free_port(), max(1, total // self.n)) for _ in range(self.n)]

    @property
    def urls(self) -> list[str]:
        return [c.url for c in self.children]

    def start(self) -> None:
        for c in self.children:
            self._spawn(c)
        threading.Thread(target=self._supervise, name="tokenmill-local", daemon=True).start()

    def _spawn(self, c: Child) -> None:
        cmd = [sys.executable, "-m", "tokenmill", "serve", "--port", str(c.port), "--num-threads", str(c.threads),
               *self.serve_args]
        c.proc = subprocess.Popen(cmd, preexec_fn=_die_with_parent)
        log.info("replica %s started (pid %d, %d threads)", c.url, c.proc.pid, c.threads)

    def _supervise(self) -> None:
        while not self._stop.wait(0.5):
            for c in self.children:
                code = c.proc.poll() if c.proc is not None else None
                if code is not None and not self._stop.is_set():
                    log.warning("replica %s exited with %s; restarting", c.url, code)
                    time.sleep(self.restart_delay_s)  # a replica that dies at start must not spin
                    self._spawn(c)
                    c.restarts += 1

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        for c in self.children:
            if c.proc is not None and c.proc.poll() is None:
                c.proc.terminate()  # SIGTERM: each drains its requests
        for c in self.children:
            if c.proc is None:
                continue
            try:
                c.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait(10)
