"""Request: all per-request state the scheduler, the KV cache and the runner share."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tokenmill.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    # Something failed inside this request's own work (its sampling, its grammar): it alone
    # ends, and its caller gets an internal error rather than a truncated answer.
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_order: int
    max_tokens: int  # resolved: params.max_tokens or what the context length leaves
    eos_token_ids: tuple[int, ...] = ()
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # one per full block of all_token_ids
    num_keyed_blocks: int = 0  # leading blocks of block_ids keyed in the prefix cache with its own hashes
    num_cached_tokens: int = -1  # prefix-cache hit at first scheduling (-1: not scheduled yet)
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    priority: int = 0  # vLLM's convention: a lower value is served first
    # tokenmill.structured.GrammarMatcher when the output is constrained: the sampler masks
    # with it, the engine advances it with each accepted token.
    grammar: object | None = None
    # Speculative decoding: how many drafts to ask for next step (adapts to acceptance), and
    # after drafts that were all rejected, how many steps to decode without any.
    draft_len: int = 0
    spec_misses: int = 0  # consecutive verify steps that accepted nothing
    spec_pause: int = 0

    @property
    def rank(self) -> tuple[int, int]:
        """The scheduling order: priority first, then arrival."""
        return (self.priority, self.arrival_order)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_to_compute(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def max_total_tokens(self) -> int:
        return self.num_prompt_tokens + self.max_tokens

    @property
    def can_speculate(self) -> bool:
        """Drafts are verified with one distribution for all positions, so requests whose
        sampling depends on the tokens just before (grammar, penalties, min_tokens still
        banning stops) decode one token at a time. So do seeded sampled requests: whether a
        step speculates depends on the rest of the batch, and it changes how the request's
        generator is drawn from, so its output would no longer depend on its seed alone."""
        p = self.params
        return (
            self.grammar is None and not p.needs_penalties and self.num_output_tokens >= p.min_tokens
            and (p.greedy or p.seed is None)
        )

    def tokens_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    def check_stop_token(self) -> RequestStatus | None:
        """Finish conditions that need only token ids (stop strings are the detokenizer's)."""
        if not self.output_token_ids:
            return None
        last = self.output_token_ids[-1]
        if self.num_output_tokens >= self.params.min_tokens:
            if not self.params.ignore_eos and last in self.eos_token_ids:
                self.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if last in self.params.stop_token_ids:
                self.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= self.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None
