"""The step record: what one engine step asks of the model, in ids and ints.

The engine core builds it from the scheduler's decision; the model runner consumes it (and
later a tensor-parallel worker in another process, and the planner's cost model). Nothing in
it is a live Request or a grammar matcher, so it can be pickled, sent and replayed: a
consumer never reaches back into the engine's state. Pure Python, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.sampling import SamplingParams


@dataclass
class SampleInputs:
    """What the sampler needs of a request whose chunk reaches its last token."""

    params: SamplingParams
    num_output_tokens: int  # before this step (min_tokens bans stop tokens until it is reached)
    eos_token_ids: tuple[int, ...] = ()
    # The token history, only when the params penalise repetition (else empty: not copied).
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    # Row of StepRecord.grammar_bitmask holding the tokens the request's grammar allows next.
    grammar_row: int | None = None


@dataclass
class ScheduledSeq:
    """Consecutive tokens of one sequence to run, from position `start`, through its blocks.

    `token_ids` holds the tokens to compute and then the drafts to verify (the last
    `num_drafts` entries). The draft proposer and the memory profile build bare ones.
    """

    block_ids: list[int]
    start: int
    token_ids: list[int]
    # The chunk starts inside the prompt (a recompute after preemption included). It orders
    # the step's rows (generated tokens first, then prompt chunks; runner.batch_order) and the
    # planner's cost model reads it; no kernel depends on it (every row runs the same ones).
    prompt: bool = False
    request_id: str = ""
    num_drafts: int = 0
    # First step since the request was admitted (or readmitted after a preemption).
    new: bool = False
    sample: SampleInputs | None = None  # set when the chunk reaches the request's last token

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)

    @property
    def num_computed(self) -> int:
        """Positions whose KV this step writes for good (the drafts' may be rejected)."""
        return len(self.token_ids) - self.num_drafts

    @property
    def draft_token_ids(self) -> list[int]:
        return self.token_ids[len(self.token_ids) - self.num_drafts :]


@dataclass
class StepRecord:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    # Requests that ended since the last record: the runner drops per-request state (seeded
    # generators) for them.
    finished_request_ids: list[str] = field(default_factory=list)
    # int32 [constrained rows, ceil(vocab / 32)] (numpy), one row per SampleInputs.grammar_row.
    grammar_bitmask: object | None = None

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass
class DraftRequest:
    """A decoding request that reserved lookahead slots: what a proposer needs to guess its
    next tokens (and, for a draft model, where to write its own KV)."""

    request_id: str
    token_ids: list[int]  # the prompt and every token generated so far
    block_ids: list[int]
    num_lookahead: int  # the most drafts the slots hold
