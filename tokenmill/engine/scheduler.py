"""Continuous batching: which requests run this step and how many tokens each computes.

One step, one batch: decode tokens and prefill chunks share a single token budget. Running
requests go first, then waiting ones are admitted while budget, sequence slots and KV blocks
last. Out of blocks, a running request is preempted: its blocks are freed and it is recomputed
later.

Priority (vLLM's convention: a lower value is served first, default 0): requests wait in
(priority, arrival) order, running ones take the budget by priority, the preempted one is the
lowest priority and, among equals, the one that loses least work (fewest computed tokens). A
waiting request that finds no seat or no blocks displaces running requests of strictly lower
priority, so batch work (a high value) only ever runs on what interactive work leaves.
A request's prefill is the step its caller waits on for a first token, so a step that
computes prompt tokens of some priority leaves lower-priority work out (see _step_floor).

Speculative decoding: a decoding request may also reserve lookahead slots (budget and KV) for
drafts; the engine's proposer fills them after scheduling and update() commits the accepted
ones, then frees the slots of the rejected. Lookahead is handed out last, from the budget and
blocks nobody else needed, and not at all when more requests run than speculation pays for.
Pure Python: no torch, no wall clock.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from tokenmill.config import EngineConfig
from tokenmill.engine.kv_cache import KVCacheManager
from tokenmill.engine.request import Request, RequestStatus


@dataclass
class ScheduledChunk:
    request: Request
    num_tokens: int  # tokens to compute this step, starting at request.num_computed_tokens
    # Speculative decoding: KV slots reserved past the request's tokens, and the draft tokens
    # a proposer put in them (at most num_lookahead) for the model to verify.
    num_lookahead: int = 0
    draft_token_ids: list[int] = field(default_factory=list)
    new: bool = False  # admitted from the waiting queue this step

    @property
    def prompt(self) -> bool:
        """The chunk starts inside the prompt (a recompute after preemption included)."""
        return self.start < self.request.num_prompt_tokens

    @property
    def start(self) -> int:
        return self.request.num_computed_tokens

    @property
    def end(self) -> int:
        return self.request.num_computed_tokens + self.num_tokens

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the request's last token, so its logits give a new token."""
        return self.end == self.request.num_tokens

    @property
    def num_scheduled(self) -> int:
        """Positions the forward pass computes: the request's tokens plus its drafts."""
        return self.num_tokens + len(self.draft_token_ids)


@dataclass
class _Budget:
    """One step's token budget, with the share lower-priority work may take of it.

    `top` is the best priority present (running or first in the queue); requests of a
    lower priority (a higher value) draw on `lower` as well as on `left`.
    """

    left: int
    lower: float
    top: float

    def room(self, request: Request) -> int:
        return int(min(self.left, self.lower)) if request.priority > self.top else self.left

    def take(self, request: Request, num_tokens: int) -> None:
        self.left -= num_tokens
        if request.priority > self.top:
            self.lower -= num_tokens

    def give_back(self, request: Request, num_tokens: int) -> None:
        self.take(request, -num_tokens)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_scheduled for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        num_speculative_tokens: int = 0,
        speculative_disable_by_batch_size: int = 0,
        lower_priority_step_tokens: int | None = None,
    ):
        self.kv = kv
        # None: no cap (see _Budget and schedule()); the engine's setting is a number.
        self.lower_priority_step_tokens = lower_priority_step_tokens
        self._num_steps = 0
        self._ran_at: dict[Request, int] = {}  # the step a request last ran in (lower-priority rotation)
        self.num_speculative_tokens = num_speculative_tokens  # 0: no lookahead slots, ever
        self.speculative_disable_by_batch_size = speculative_disable_by_batch_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    @classmethod
    def from_config(cls, config: EngineConfig, num_blocks: int, max_model_len: int) -> "Scheduler":
        """A scheduler over a fresh KV cache manager, from settings alone: what the engine core
        builds, and what a simulator steps with fake token ids on a virtual clock."""
        kv = KVCacheManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        return cls(
            kv, config.scheduler.max_num_seqs, config.scheduler.max_num_batched_tokens, max_model_len,
            config.speculative.num_lookahead_tokens, config.speculative.speculative_disable_by_batch_size,
            config.scheduler.lower_priority_step_tokens,
        )

    # -- admission -----------------------------------------------------------------------
    def check_admissible(self, request: Request) -> None:
        """Refuse up front what could never run, so it can't starve the queue."""
        if request.num_prompt_tokens == 0:
            raise ValueError("the prompt is empty")
        if request.max_total_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({request.num_prompt_tokens} tokens) + max_tokens ({request.max_tokens}) = "
                f"{request.max_total_tokens} exceeds the maximum context length {self.max_model_len}"
            )
        if self.kv.blocks_for(request.max_total_tokens) > self.kv.num_blocks:
            raise ValueError(
                f"prompt + max_tokens = {request.max_total_tokens} tokens needs more KV blocks "
                f"than the whole pool holds ({self.kv.num_blocks} blocks of {self.kv.block_size})"
            )

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.check_admissible(request)
        request.draft_len = self.num_speculative_tokens
        self.requests[request.request_id] = request
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        """Into the waiting queue by rank (priority, arrival): a preempted request resumes
        before later arrivals of its priority."""
        if not self.waiting or self.waiting[-1].rank <= request.rank:
            self.waiting.append(request)  # the common case, without the O(n) search
        else:
            self.waiting.insert(bisect.bisect_right([r.rank for r in self.waiting], request.rank), request)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- one step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self._num_steps += 1
        budget = self._budget()
        scheduled: dict[Request, tuple[int, int]] = {}  # request -> (tokens, lookahead slots)
        preempted: list[Request] = []
        admitted: set[Request] = set()
        speculate = self.num_speculative_tokens > 0 and len(self.running) <= self.speculative_disable_by_batch_size
        floor = self._step_floor()

        def drop(victim: Request) -> None:
            if victim in scheduled:
                budget.give_back(victim, sum(scheduled.pop(victim)))

        # By priority; among equals admission order, except that capped lower-priority requests
        # take turns (the one that ran longest ago first), so a cap never starves one of them.
        def order(r: Request) -> tuple[int, int]:
            return r.priority, self._ran_at.get(r, 0) if r.priority > budget.top else 0

        for request in sorted(self.running, key=order):
            num_new = min(request.num_tokens_to_compute, budget.room(request))
            if num_new == 0 or request.priority > floor:
                break  # sorted: everything after is below the floor or out of budget too (it keeps its blocks)
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            while not self.kv.allocate_slots(request, num_new):
                victim = self._pick_victim()
                self._preempt(victim)
                preempted.append(victim)
                drop(victim)
                if victim is request:
                    break
            else:
                scheduled[request] = (num_new, 0)
                budget.take(request, num_new)

        # Admitting new work right after preempting for memory would only thrash.
        thrashing = bool(preempted)
        displaced: list[Request] = []
        while self.waiting and not thrashing:
            request = self.waiting[0]
            if request.priority > floor or budget.room(request) == 0:
                break  # the queue is in rank order: the rest is below the floor or out of budget too
            if displaced and request.priority >= min(r.priority for r in displaced):
                break  # what was just displaced (or its equal) waits for a later step
            if len(self.running) < self.max_num_seqs:
                computed_blocks, num_hit = self.kv.get_computed_blocks(request)
                request.num_computed_tokens = num_hit
                num_new = min(request.num_tokens_to_compute, budget.room(request))
                if self.kv.allocate_slots(request, num_new, computed_blocks):
                    self._admit(request, num_hit)
                    admitted.add(request)
                    scheduled[request] = (num_new, 0)
                    budget.take(request, num_new)
                    continue
                request.num_computed_tokens = 0
            victim = self._pick_victim(below=request.priority)
            if victim is None:
                break
            self._preempt(victim)
            preempted.append(victim)
            displaced.append(victim)
            drop(victim)

        # Drafts last, from what is left: they never cost anyone a preemption or an admission.
        if speculate:
            for request, (num_new, _) in scheduled.items():
                lookahead = self._lookahead(request, num_new, budget.room(request))
                if lookahead and self.kv.allocate_slots(request, num_new + lookahead):
                    scheduled[request] = (num_new, lookahead)
                    budget.take(request, lookahead)

        for request in scheduled:
            self._ran_at[request] = self._num_steps
        chunks = [ScheduledChunk(r, n, lookahead, new=r in admitted) for r, (n, lookahead) in scheduled.items()]
        return SchedulerOutput(chunks=chunks, preempted=preempted)

    def _budget(self) -> _Budget:
        """This step's budget. While requests of several priorities are present, those below
        the best take at most lower_priority_step_tokens of it.

        Why: a step cannot be interrupted, so an interactive request that arrives waits for
        the step in progress before its own prefill runs (_step_floor). Beside interactive
        traffic, a step full of batch rows is what it would wait for; a few batch tokens per
        step keep that wait (and the interactive requests' own decode steps) short, while
        the batch still advances every step. With one priority present, nothing is capped,
        so a batch alone runs at full speed.
        """
        top = min((r.priority for r in self.running), default=float("inf"))
        if self.waiting:
            top = min(top, self.waiting[0].priority)
        cap = self.lower_priority_step_tokens
        return _Budget(self.max_num_batched_tokens, float("inf") if cap is None else cap, top)

    def _step_floor(self) -> float:
        """The lowest priority (highest value) this step may run: the best priority among
        requests with prompt tokens to compute (waiting, or running inside their prompt),
        or every priority when none has.

        Why: a step costs about what all its rows cost together, and an interactive request's
        first token comes out of its prefill step. Run beside 31 decoding batch rows, that step
        costs what a full batch step costs; run alone, what the prompt costs. So while higher-
        priority work prefills, lower-priority running requests sit the step out (not
        preempted: they keep their blocks and decode again the step after) and lower-priority
        waiting ones are not admitted. They lose one step per interactive prefill chunk, never
        more, so batch work is not starved by intermittent traffic. Among equal priorities
        nothing changes: decode rows still ride along with a prefill, which is what keeps a
        single-priority workload's throughput.
        """
        best = self.waiting[0].priority if self.waiting else None  # the queue is in rank order
        for r in self.running:
            if r.num_computed_tokens < r.num_prompt_tokens and (best is None or r.priority < best):
                best = r.priority
        return float("inf") if best is None else best

    def _lookahead(self, request: Request, num_new: int, budget: int) -> int:
        """Draft slots for a decoding request: its adaptive k, within the budget left, and never
        more than the tokens it may still produce (a step yields accepted drafts + one)."""
        if num_new != 1 or request.num_tokens_to_compute != 1 or request.spec_pause or not request.can_speculate:
            return 0
        return max(0, min(request.draft_len, budget, request.max_total_tokens - request.num_tokens - 1))

    def _admit(self, request: Request, num_hit: int) -> None:
        self.waiting.popleft()
        self.kv.record_lookup(request, num_hit)
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_hit
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def _pick_victim(self, below: int | None = None) -> Request | None:
        """The lowest priority running request; among equals the one that loses least work
        (fewest computed tokens), then the latest arrival. With `below`, only a request of
        strictly lower priority than that (a higher value), or None."""
        candidates = [r for r in self.running if below is None or r.priority > below]
        if not candidates:
            return None
        return min(candidates, key=lambda r: (-r.priority, r.num_computed_tokens, -r.arrival_order))

    def _preempt(self, request: Request) -> None:
        self._ran_at.pop(request, None)
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(request)

    # -- after the forward pass ----------------------------------------------------------
    def update(self, output: SchedulerOutput, sampled: dict[str, list[int]]) -> list[Request]:
        """Advance computed tokens, append sampled tokens; return requests finished by a stop
        token or length (their blocks are already freed).

        With drafts, sampled holds the accepted drafts then one token of the model's own: the
        accepted drafts' KV is kept, the rejected drafts' slots are given back. Tokens after a
        stop token are dropped, as if decoded one by one.
        """
        finished: list[Request] = []
        for chunk in output.chunks:
            request = chunk.request
            request.num_computed_tokens += chunk.num_tokens
            tokens = sampled.get(request.request_id)
            if not tokens:
                continue
            if chunk.draft_token_ids:
                accepted = len(tokens) - 1
                request.num_computed_tokens += accepted
                self._adapt_speculation(request, accepted)
            elif chunk.num_lookahead:
                self._adapt_speculation(request, 0)  # slots reserved, nothing proposed: a miss too
            elif request.spec_pause:
                request.spec_pause -= 1
            for token in tokens:
                request.output_token_ids.append(token)
                status = request.check_stop_token()
                if status is not None:
                    self.finish(request, status)
                    finished.append(request)
                    break
            if chunk.num_lookahead and not request.is_finished:
                self.kv.trim(request)
        return finished

    def _adapt_speculation(self, request: Request, accepted: int) -> None:
        # The draft length: one more than the run just accepted, capped at the maximum. A step that accepted
        # nothing also pauses drafting for 1, 3, 7, then 15 steps (doubling while misses
        # continue), so text with nothing to guess costs almost nothing extra.
        request.draft_len = min(self.num_speculative_tokens, accepted + 1)
        request.spec_misses = 0 if accepted else request.spec_misses + 1
        request.spec_pause = (1 << min(request.spec_misses, 4)) - 1

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Finish a request for any reason (stop, length, abort): free its blocks, forget it."""
        if request.is_finished:
            return
        self._ran_at.pop(request, None)
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request)
        request.status = status
        self.requests.pop(request.request_id, None)

    def abort(self, request_id: str) -> Request | None:
        request = self.requests.get(request_id)
        if request is not None:
            self.finish(request, RequestStatus.FINISHED_ABORTED)
        return request
