"""Turns on the CPU cores for the engines of one process (an LLM and an encoder served side by
side): each engine step or embedding batch runs inside a turn, and turns are granted in the
order they were asked for.

Why: two engines stepping at once each start their own team of torch threads on the same
cores, so both run slower than taking turns would make them (oversubscription), and the
OS shares the cores by how long each keeps them busy: a long prefill takes most of them.
A plain lock would not do either: a thread that releases it and asks again at once usually
gets it back, so the engine that is always busy would starve the other. Here a waiting
engine is served before one that asks again: with both busy they alternate, one unit of
work each (the encoder bounds its unit, see AsyncEmbedder.TURN_TOKENS); alone, an engine
waits for nobody.

Off by default (TOKENMILL_CORE_TURNS=1 turns it on): the measurement said no. Alternating
by units of work is not fair in time when one unit (2048 encoder tokens) lasts many decode
steps: each chat token then waits a whole unit. Without turns the OS slows each engine by
about the share the other takes, which starves neither. Kept for the comparison; what
would make turns pay off is granting them by time used (the engine with the least goes
next) with encoder units as short as a decode step.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class CoreTurns:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0
        self.enabled = True  # off: every turn is granted at once

    @property
    def waiting(self) -> int:
        """Turns asked for and not yet granted (the one running is not counted)."""
        with self._cond:
            return max(0, self._next_ticket - self._serving - 1)

    @contextmanager
    def turn(self) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            while self._serving != ticket:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._serving += 1
                self._cond.notify_all()


# One per process: the engines share the process's cores whichever server or LLM made them.
CORE_TURNS = CoreTurns()
# Off unless TOKENMILL_CORE_TURNS=1: measured (benchmarks/embed_share.py --compare-turns,
# docs/benchmarks.md) on 2 cores, a decode step waiting for a 2048-token encoder unit made
# the chat's time per token far worse than the OS sharing the cores between both engines.
CORE_TURNS.enabled = os.environ.get("TOKENMILL_CORE_TURNS", "0") == "1"
