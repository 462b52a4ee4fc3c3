"""Waiting for a router's state to change, for tests that watch it over HTTP."""

import time


def until(cond, timeout: float, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(step)
    raise AssertionError(f"not within {timeout}s")
