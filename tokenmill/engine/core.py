"""EngineCore: one step is schedule -> execute -> update, over token ids only.

The core owns the scheduler (with its KV cache manager), the requests' grammar matchers and
an executor: the model runner today, a tensor-parallel driver or the planner's cost model
later. It sends the executor a StepRecord (ids and ints, never a live Request) and gets
sampled tokens back. It knows nothing of text, of n > 1 or of time: the output processor on
the other side of CoreOutput detokenizes, cuts stop strings, fans n > 1 back in and stamps
the metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from tokenmill.config import EngineConfig
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from tokenmill.engine.stats import EngineStats
from tokenmill.outputs import SampleResult, TokenLogprobs
from tokenmill.step import DraftRequest, SampleInputs, ScheduledSeq, StepRecord

log = logging.getLogger("tokenmill")


class Executor(Protocol):
    def execute(self, record: StepRecord) -> dict[str, list[SampleResult]]:
        """Per request that reached its last token: the accepted drafts, then one token."""


class Proposer(Protocol):
    """Speculative decoding: guesses tokens ahead for the executor to verify."""

    def propose(self, requests: list[DraftRequest]) -> dict[str, list[int]]:
        """Drafts (at most num_lookahead) per request id; a request left out gets none."""

    def observe(self, record: StepRecord) -> None:
        """Called after the executor ran `record`, before its tokens are committed."""


@dataclass
class CoreOutput:
    """What one step did for one request: tokens kept, and how it ended if it did."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id, or why it was aborted or failed
    num_cached_tokens: int = -1  # prefix-cache hit at first scheduling (-1: not scheduled yet)


class EngineCore:
    def __init__(
        self, config: EngineConfig, executor: Executor, num_blocks: int, max_model_len: int,
        vocab_size: int, tokenizer=None, proposer: Proposer | None = None, stats: EngineStats | None = None,
    ):
        self.config = config
        self.executor = executor
        self.proposer = proposer
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer  # only the grammar compiler reads it (its vocabulary)
        self.scheduler = Scheduler.from_config(config, num_blocks, max_model_len)
        self.kv = self.scheduler.kv
        self.stats = stats or EngineStats()
        self.stats.kv_blocks_total = num_blocks
        self.stats.spec_accepted_per_pos = [0] * self.scheduler.num_speculative_tokens
        # Requests whose grammar is still compiling wait here, outside the scheduler, so a
        # slow compile never holds up the batch.
        self._compiling: dict[str, tuple[Request, Future]] = {}
        self._finished_ids: list[str] = []  # since the last record: the executor drops their state
        self.last_record: StepRecord | None = None  # what the last step computed (the step log's line)
        self._grammars = None
        self._grammars_lock = threading.Lock()

    @property
    def grammars(self):
        """The grammar compiler (llguidance loads on the first constrained request; the server's
        event loop and the engine thread may both ask first, hence the lock)."""
        with self._grammars_lock:
            if self._grammars is None:
                from tokenmill.structured.compiler import GrammarCompiler

                self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size)
            return self._grammars

    # -- requests ------------------------------------------------------------------------
    def add_request(self, request: Request, grammar: Future | None = None) -> None:
        if grammar is None:
            self.scheduler.add_request(request)
        else:
            self.scheduler.check_admissible(request)
            self._compiling[request.request_id] = (request, grammar)
        # Counted as waiting now, not after the next step: a slow step would hide a queue.
        self._refresh_gauges()

    def abort(self, request_id: str) -> None:
        if self._compiling.pop(request_id, None) is None and self.scheduler.abort(request_id) is None:
            return
        self._finished_ids.append(request_id)
        self._refresh_gauges()

    def stop(self, request_id: str) -> None:
        """The output processor found a stop string: finish the request as stopped."""
        request = self.scheduler.requests.get(request_id)
        if request is not None:
            self.scheduler.finish(request, RequestStatus.FINISHED_STOPPED)
            self._finished_ids.append(request_id)
            self._refresh_gauges()

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting + len(self._compiling)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished or bool(self._compiling)

    # -- one step ------------------------------------------------------------------------
    def step(self) -> list[CoreOutput]:
        outputs = self._admit_compiled() if self._compiling else []
        sched = self.scheduler.schedule()
        sampled: dict[str, list[SampleResult]] = {}
        self.last_record = None
        if not sched.is_empty:
            record = self._record(sched)
            self.last_record = record  # what this step computed, for the step log
            sampled, executed = self._execute(record)
            # Only now: a step that failed hands the same ids to the next one.
            del self._finished_ids[: len(record.finished_request_ids)]
            self._after_execute(sched, executed, sampled)
            self.stats.num_steps += 1
            self.stats.last_step_tokens = sched.num_batched_tokens
        outputs += self._update(sched, sampled)
        self._refresh_gauges()
        return outputs

    def _admit_compiled(self) -> list[CoreOutput]:
        """Requests whose grammar finished compiling join the scheduler; a failed one ends."""
        outputs = []
        for request_id, (request, fut) in list(self._compiling.items()):
            if not fut.done():
                continue
            del self._compiling[request_id]
            try:
                template = fut.result()
                request.grammar = self.grammars.matcher(template)
            except ValueError as e:
                outputs.append(self._end_unscheduled(request, RequestStatus.FINISHED_ABORTED, str(e)))
                continue
            except Exception as e:  # the compiler broke on this grammar: this request fails, not the engine
                log.exception("request %s: grammar matcher failed", request_id)
                outputs.append(self._end_unscheduled(request, RequestStatus.FINISHED_ERROR, _failure("grammar", e)))
                continue
            self.scheduler.add_request(request)
        return outputs

    def _end_unscheduled(self, request: Request, status: RequestStatus, reason: str) -> CoreOutput:
        """End a request that never reached the scheduler (its grammar was compiling)."""
        request.status = status
        request.stop_reason = reason
        self._finished_ids.append(request.request_id)
        return CoreOutput(request.request_id, finish_reason=status.value, stop_reason=reason)

    def _record(self, sched: SchedulerOutput) -> StepRecord:
        if self.proposer is not None:
            self._propose(sched)
        constrained = [c.request for c in sched.chunks if c.samples and c.request.grammar is not None]
        bitmask = None
        if constrained:
            from tokenmill.structured.compiler import allocate_bitmask

            bitmask = allocate_bitmask(len(constrained), self.vocab_size)
            for row, request in enumerate(constrained):
                try:
                    request.grammar.fill_bitmask(bitmask, row)
                except Exception as e:  # this request's grammar broke: it ends, its row goes unused
                    log.exception("request %s: grammar failed to give its next tokens", request.request_id)
                    self._fail(request, _failure("grammar", e))
        rows = {r.request_id: i for i, r in enumerate(constrained)}
        # A request that failed above is not run: its blocks are already back in the pool.
        seqs = [_scheduled_seq(c, rows.get(c.request.request_id)) for c in sched.chunks if not c.request.is_finished]
        return StepRecord(seqs, list(self._finished_ids), bitmask)

    def _execute(self, record: StepRecord) -> tuple[dict[str, list[SampleResult]], list[StepRecord]]:
        """Run the record; (tokens per request, the records that ran). A failed step is run
        again one sequence at a time, so a fault that belongs to one request (its sampling
        parameters, its grammar row) fails that request alone and the rest keep their tokens.
        Writing the same KV again is harmless: same tokens, same slots. When no sequence of a
        batch of several runs alone either, the fault is the executor's: it is raised."""
        if record.is_empty:
            return {}, []
        try:
            return self.executor.execute(record), [record]
        except Exception as batch_error:
            if len(record.seqs) == 1:
                self._fail(self.scheduler.requests[record.seqs[0].request_id], _failure("generation", batch_error))
                log.exception("request %s: step failed", record.seqs[0].request_id)
                return {}, []
            sampled: dict[str, list[SampleResult]] = {}
            executed, failed = [], []
            for single in _split(record):
                try:
                    sampled.update(self.executor.execute(single))
                    executed.append(single)
                except Exception as e:
                    failed.append((single.seqs[0].request_id, e))
            if not executed:
                raise
            for request_id, e in failed:
                log.error("request %s failed alone after a failed step: %r", request_id, e)
                self._fail(self.scheduler.requests[request_id], _failure("generation", e))
            return sampled, executed

    def _propose(self, sched: SchedulerOutput) -> None:
        active = [c for c in sched.chunks if c.num_lookahead]
        if not active:
            return
        drafts = self.proposer.propose([
            DraftRequest(c.request.request_id, c.request.all_token_ids, list(c.request.block_ids), c.num_lookahead)
            for c in active
        ])
        for chunk in active:
            chunk.draft_token_ids = drafts.get(chunk.request.request_id, [])[: chunk.num_lookahead]

    def _after_execute(self, sched: SchedulerOutput, executed: list[StepRecord], sampled) -> None:
        if self.proposer is None:
            return
        for record in executed:
            self.proposer.observe(record)
        s = self.stats
        for chunk in sched.chunks:
            res = sampled.get(chunk.request.request_id)
            if not chunk.draft_token_ids or res is None:
                continue
            accepted = len(res) - 1
            s.spec_num_drafts += 1
            s.spec_num_draft_tokens += len(chunk.draft_token_ids)
            s.spec_num_accepted_tokens += accepted
            for i in range(accepted):
                s.spec_accepted_per_pos[i] += 1

    def _update(self, sched: SchedulerOutput, sampled: dict[str, list[SampleResult]]) -> list[CoreOutput]:
        before = {c.request.request_id: c.request.num_output_tokens for c in sched.chunks}
        tokens = {rid: [r.token_id for r in res] for rid, res in sampled.items()}
        for request in self.scheduler.update(sched, tokens):
            self._finished_ids.append(request.request_id)
        outputs = []
        for chunk in sched.chunks:
            request = chunk.request
            # The scheduler kept the tokens up to a stop token (or the length limit).
            new = request.output_token_ids[before[request.request_id] :]
            if request.grammar is not None:
                self._advance_grammar(request, new)
            res = sampled.get(request.request_id, ())
            outputs.append(CoreOutput(
                request.request_id, new, [r.logprobs for r in res[: len(new)]],
                request.status.value if request.is_finished else None,
                request.stop_reason if request.is_finished else None,
                request.num_cached_tokens,
            ))
        return outputs

    def _advance_grammar(self, request: Request, new_tokens: list[int]) -> None:
        """Follow the accepted tokens; a grammar at its end finishes the request ("stop")."""
        grammar = request.grammar
        for token in new_tokens:
            if request.is_finished:
                return
            try:
                accepted = grammar.advance(token)
            except Exception as e:  # this request's grammar broke: it ends, the batch goes on
                log.exception("request %s: grammar failed to follow a token", request.request_id)
                self._fail(request, _failure("grammar", e))
                return
            if not accepted:
                # Cannot happen with the mask applied; end the request rather than emit garbage.
                request.stop_reason = f"grammar error: {grammar.error}"
                self._finish(request, RequestStatus.FINISHED_ABORTED)
            elif grammar.is_stopped:
                self._finish(request, RequestStatus.FINISHED_STOPPED)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        self.scheduler.finish(request, status)
        self._finished_ids.append(request.request_id)

    def _fail(self, request: Request, reason: str) -> None:
        request.stop_reason = reason
        self._finish(request, RequestStatus.FINISHED_ERROR)

    def _refresh_gauges(self) -> None:
        s = self.stats
        s.num_running = self.scheduler.num_running
        s.num_waiting = self.num_waiting
        s.kv_blocks_used = self.kv.pool.num_used_blocks
        s.num_preemptions = self.scheduler.num_preemptions
        s.prefix_cache_queries = self.kv.prefix_queries
        s.prefix_cache_hits = self.kv.prefix_hits
        s.prefix_cache_missed_hits = self.kv.missed_prefix_hits

    # -- checks and maintenance -------------------------------------------------------------
    def check_invariants(self) -> None:
        self.kv.pool.check_invariants()
        held = sum(len(r.block_ids) for r in self.scheduler.running)
        refs = sum(b.ref_cnt for b in self.kv.pool.blocks)
        assert held == refs, (held, refs)
        assert all(not r.block_ids for r in self.scheduler.waiting)

    def reset_prefix_cache(self) -> bool:
        return self.kv.reset_prefix_cache()


def _failure(where: str, error: Exception) -> str:
    # What the caller is told: the kind of fault, not its text (which may quote internals).
    return f"internal error in this request's {where}: {type(error).__name__}"


def _split(record: StepRecord) -> list[StepRecord]:
    """One record per sequence, each with its own grammar bitmask row; the finished ids go
    with the first."""
    singles = []
    for i, seq in enumerate(record.seqs):
        bitmask = None
        if seq.sample is not None and seq.sample.grammar_row is not None:
            row = seq.sample.grammar_row
            bitmask = record.grammar_bitmask[row : row + 1]
            seq = dataclasses.replace(seq, sample=dataclasses.replace(seq.sample, grammar_row=0))
        singles.append(StepRecord([seq], record.finished_request_ids if i == 0 else [], bitmask))
    return singles


def _scheduled_seq(chunk: ScheduledChunk, grammar_row: int | None) -> ScheduledSeq:
    request = chunk.request
    sample = None
    if chunk.samples:
        p = request.params
        history = p.needs_penalties  # only penalties read the history: don't copy it otherwise
        sample = SampleInputs(
            p, request.num_output_tokens, request.eos_token_ids,
            list(request.prompt_token_ids) if history else [], list(request.output_token_ids) if history else [],
            grammar_row,
        )
    return ScheduledSeq(
        list(request.block_ids), chunk.start,
        request.tokens_slice(chunk.start, chunk.end) + chunk.draft_token_ids,
        chunk.prompt, request.request_id, len(chunk.draft_token_ids), chunk.new, sample,
    )
