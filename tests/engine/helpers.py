"""Small builders and checks shared by the engine tests (not a test module itself)."""

from __future__ import annotations

import itertools

from tokenmill.engine.request import Request
from tokenmill.sampling import SamplingParams

# Requests made without an explicit arrival order arrive in the order they were built, which
# is what the scheduler's FCFS queue and its preemption tie-break assume.
_arrivals = itertools.count()


def make_request(
    request_id: str,
    prompt: list[int],
    max_tokens: int = 16,
    *,
    arrival_order: int | None = None,
    **sampling,
) -> Request:
    """A Request as the engine would build it: max_tokens resolved, params validated.
    Extra keyword arguments go to SamplingParams."""
    return Request(
        request_id=request_id,
        prompt_token_ids=list(prompt),
        params=SamplingParams(max_tokens=max_tokens, **sampling),
        arrival_order=next(_arrivals) if arrival_order is None else arrival_order,
        max_tokens=max_tokens,
    )


def assert_pool_whole(engine) -> None:
    """Every KV block back in the pool and the bookkeeping consistent: the rule every
    scenario ends on. One place for it, so the tests don't each know where the pool lives."""
    engine.check_invariants()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
