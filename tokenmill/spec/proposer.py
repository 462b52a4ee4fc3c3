"""The interface every proposer has: fill drafts after scheduling, observe the step after."""

from __future__ import annotations

from typing import Protocol

from tokenmill.engine.scheduler import SchedulerOutput


class Proposer(Protocol):
    def propose(self, output: SchedulerOutput) -> None:
        """Set draft_token_ids (at most num_lookahead) on each chunk that reserved lookahead."""

    def observe(self, output: SchedulerOutput) -> None:
        """Called after the target's forward pass over `output`, before tokens are committed."""
