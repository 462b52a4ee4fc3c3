"""Engine: step() = schedule -> execute -> update. Requests in, cumulative outputs out."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from tokenmill.config import EngineConfig
from tokenmill.engine.detokenize import IncrementalDetokenizer
from tokenmill.engine.kv_cache import KVCacheManager
from tokenmill.outputs import CompletionOutput, RequestMetrics, RequestOutput
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import Scheduler
from tokenmill.sampling import SamplingParams

# How long add_request waits for a new grammar to compile before letting it finish in the
# background (the request then waits outside the scheduler and never holds up the batch).
GRAMMAR_WAIT_S = 0.05


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later (HTTP 429)."""


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    num_preemptions: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_steps: int = 0
    last_step_seconds: float = 0.0
    last_step_tokens: int = 0
    # speculative decoding (vLLM's names): verify steps with drafts, drafts, accepted drafts
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: list[int] = field(default_factory=list)  # [k]: accepted at draft position i

    @property
    def spec_acceptance_rate(self) -> float:
        return self.spec_num_accepted_tokens / self.spec_num_draft_tokens if self.spec_num_draft_tokens else 0.0

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass
class _Group:
    """One user request; n > 1 fans out to n engine requests that share the prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    detoks: list[IncrementalDetokenizer]
    metrics: RequestMetrics
    finish_reasons: list[str | None] = field(default_factory=list)
    logprobs: list[list] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(r is not None for r in self.finish_reasons)


class Engine:
    def __init__(
        self, config: EngineConfig, runner, tokenizer, max_model_len: int, num_blocks: int, proposer=None
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.runner = runner
        self.proposer = proposer  # tokenmill.spec.proposer.Proposer, when speculating
        self.max_model_len = max_model_len
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        lookahead = config.num_lookahead_tokens if proposer is not None else 0
        self.scheduler = Scheduler(
            self.kv, config.max_num_seqs, config.max_num_batched_tokens, max_model_len,
            lookahead, config.speculative_disable_by_batch_size,
        )
        self.groups: dict[str, _Group] = {}
        self.child_to_group: dict[str, tuple[_Group, int]] = {}
        self._arrivals = 0
        self.stats = EngineStats(kv_blocks_total=num_blocks, spec_accepted_per_pos=[0] * lookahead)
        self._grammars = None  # tokenmill.structured.compiler.GrammarCompiler, built on first use
        self._compiling: dict[str, object] = {}  # request id -> Future of its grammar

    @property
    def grammars(self):
        """The grammar compiler (llguidance loads on the first constrained request)."""
        if self._grammars is None:
            from tokenmill.structured.compiler import GrammarCompiler

            self._grammars = GrammarCompiler(self.tokenizer, self.runner.model.config.vocab_size)
        return self._grammars

    # -- requests ------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, arrival_time: float | None = None
    ) -> None:
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        if self.scheduler.num_waiting + params.n > self.config.max_waiting_requests:
            raise QueueFullError(f"the waiting queue is full ({self.config.max_waiting_requests} requests)")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
            vocab = self.runner.model.config.vocab_size
            if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
                raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(ids)
        if max_tokens < 1:
            raise ValueError(f"the prompt ({len(ids)} tokens) leaves no room in the context ({self.max_model_len})")
        eos = tuple(self.tokenizer.eos_token_ids) if self.tokenizer is not None else ()
        grammar = None
        if params.structured is not None:
            grammar = self.grammars.submit(params.structured)
            try:
                grammar.result(GRAMMAR_WAIT_S)  # raises ValueError naming what is wrong
            except TimeoutError:
                pass
        children, detoks = [], []
        for j in range(params.n):
            child_params = params
            if params.n > 1:
                seed = None if params.seed is None else params.seed + j
                child_params = dataclasses.replace(params, n=1, seed=seed)
            child = Request(
                request_id=request_id if params.n == 1 else f"{request_id}#{j}",
                prompt_token_ids=ids,
                params=child_params,
                arrival_order=self._arrivals,
                max_tokens=max_tokens,
                eos_token_ids=eos,
            )
            self._arrivals += 1
            self.scheduler.check_admissible(child)
            children.append(child)
            detoks.append(
                IncrementalDetokenizer(
                    self.tokenizer, ids, params.stop, params.include_stop_str_in_output, params.skip_special_tokens
                )
            )
        group = _Group(
            request_id, text, ids, children, detoks,
            RequestMetrics(arrival_time=arrival_time if arrival_time is not None else time.monotonic()),
            finish_reasons=[None] * params.n,
            logprobs=[[] for _ in range(params.n)],
        )
        for j, child in enumerate(children):
            self.child_to_group[child.request_id] = (group, j)
        self.groups[request_id] = group
        if grammar is not None and not grammar.done():
            self._compiling[request_id] = grammar
        else:
            self._admit(group, grammar)

    def _admit(self, group: _Group, grammar) -> None:
        """Hand a group's requests to the scheduler, each with its own grammar matcher."""
        if grammar is not None:
            template = grammar.result()
            for child in group.children:
                child.grammar = self.grammars.matcher(template)
        for child in group.children:
            self.scheduler.add_request(child)

    def _admit_compiled(self) -> list[RequestOutput]:
        """Requests whose grammar finished compiling join the scheduler; a failed one finishes."""
        outputs = []
        for request_id, fut in list(self._compiling.items()):
            if not fut.done():
                continue
            del self._compiling[request_id]
            group = self.groups[request_id]
            try:
                fut.result()
            except ValueError as e:
                for j, child in enumerate(group.children):
                    child.status = RequestStatus.FINISHED_ABORTED
                    child.stop_reason = str(e)
                    group.finish_reasons[j] = "abort"
                outputs.append(self._finish_group(group))
                continue
            self._admit(group, fut)
        return outputs

    def abort_request(self, request_id: str) -> RequestOutput | None:
        group = self.groups.get(request_id)
        if group is None:
            return None
        self._compiling.pop(request_id, None)
        for j, child in enumerate(group.children):
            if group.finish_reasons[j] is None:
                self.scheduler.abort(child.request_id)
                group.finish_reasons[j] = "abort"
        return self._finish_group(group)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.groups)

    # -- one step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        early = self._admit_compiled() if self._compiling else []
        sched = self.scheduler.schedule()
        touched: dict[str, _Group] = {}
        if not sched.is_empty:
            if self.proposer is not None:
                self.proposer.propose(sched)
            results = self.runner.execute(sched)
            if self.proposer is not None:
                self.proposer.observe(sched)
                self._count_drafts(sched, results)
            now = time.monotonic()
            before: dict[str, int] = {}
            for chunk in sched.chunks:
                group, _ = self.child_to_group[chunk.request.request_id]
                if group.metrics.scheduled_time is None:
                    group.metrics.scheduled_time = now
                before[chunk.request.request_id] = chunk.request.num_output_tokens
            finished = self.scheduler.update(sched, {rid: [r.token_id for r in res] for rid, res in results.items()})
            for rid, res in results.items():
                group, j = self.child_to_group[rid]
                request = group.children[j]
                touched[group.request_id] = group
                if group.metrics.first_token_time is None:
                    group.metrics.first_token_time = now
                    self.stats.prompt_tokens_total += len(group.prompt_token_ids)
                # The scheduler keeps the tokens up to a stop token; the detokenizer may stop
                # earlier still (a stop string), and then the tokens after it are dropped.
                num_kept = request.num_output_tokens - before[rid]
                for k, result in enumerate(res[:num_kept]):
                    self.stats.generation_tokens_total += 1
                    if result.logprobs is not None:
                        group.logprobs[j].append(result.logprobs)
                    if request.grammar is not None and not request.is_finished:
                        self._advance_grammar(request)
                    if group.detoks[j].add_token(result.token_id):
                        del request.output_token_ids[before[rid] + k + 1 :]
                        request.stop_reason = group.detoks[j].stop_reason
                        self.scheduler.finish(request, RequestStatus.FINISHED_STOPPED)  # no-op if done
                        group.finish_reasons[j] = "stop"
                        break
                else:
                    if request.is_finished:
                        group.finish_reasons[j] = request.status.value
            for request in finished:
                self.runner.sampler.forget(request.request_id)
        outputs = early
        for group in touched.values():
            if group.finished:
                outputs.append(self._finish_group(group))
            else:
                outputs.append(self._output(group))
        self._update_stats(time.perf_counter() - t0, sched.num_batched_tokens)
        if self.config.debug_checks:
            self.check_invariants()
        return outputs

    def _count_drafts(self, sched, results) -> None:
        s = self.stats
        for chunk in sched.chunks:
            res = results.get(chunk.request.request_id)
            if not chunk.draft_token_ids or res is None:
                continue
            accepted = len(res) - 1
            s.spec_num_drafts += 1
            s.spec_num_draft_tokens += len(chunk.draft_token_ids)
            s.spec_num_accepted_tokens += accepted
            for i in range(accepted):
                s.spec_accepted_per_pos[i] += 1

    def _advance_grammar(self, request: Request) -> None:
        """Follow the accepted token; a grammar at its end finishes the request ("stop")."""
        grammar = request.grammar
        if not grammar.advance(request.output_token_ids[-1]):
            # Cannot happen with the mask applied; end the request rather than emit garbage.
            request.stop_reason = f"grammar error: {grammar.error}"
            self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        elif grammar.is_stopped:
            self.scheduler.finish(request, RequestStatus.FINISHED_STOPPED)
        if request.is_finished:
            self.runner.sampler.forget(request.request_id)

    def _output(self, group: _Group) -> RequestOutput:
        completions = []
        for j, (child, detok) in enumerate(zip(group.children, group.detoks)):
            want_lp = child.params.logprobs is not None
            completions.append(
                CompletionOutput(
                    index=j,
                    text=detok.text if group.finish_reasons[j] else detok.visible_text,
                    token_ids=list(child.output_token_ids),
                    logprobs=list(group.logprobs[j]) if want_lp else None,
                    finish_reason=group.finish_reasons[j],
                    stop_reason=child.stop_reason,
                )
            )
        cached = max(0, min(c.num_cached_tokens for c in group.children))
        return RequestOutput(
            group.request_id, group.prompt, group.prompt_token_ids, completions,
            finished=group.finished, num_cached_tokens=cached, metrics=group.metrics,
        )

    def _finish_group(self, group: _Group) -> RequestOutput:
        group.metrics.finished_time = time.monotonic()
        for child in group.children:
            self.child_to_group.pop(child.request_id, None)
            self.runner.sampler.forget(child.request_id)
        self.groups.pop(group.request_id, None)
        return self._output(group)

    def _update_stats(self, seconds: float, tokens: int) -> None:
        s = self.stats
        s.num_running = self.scheduler.num_running
        s.num_waiting = self.scheduler.num_waiting
        s.kv_blocks_used = self.kv.pool.num_used_blocks
        s.num_preemptions = self.scheduler.num_preemptions
        s.prefix_cache_queries = self.kv.prefix_queries
        s.prefix_cache_hits = self.kv.prefix_hits
        if tokens:
            s.num_steps += 1
            s.last_step_seconds = seconds
            s.last_step_tokens = tokens

    def check_invariants(self) -> None:
        self.kv.pool.check_invariants()
        held = sum(len(r.block_ids) for r in self.scheduler.running)
        refs = sum(b.ref_cnt for b in self.kv.pool.blocks)
        assert held == refs, (held, refs)
        assert all(not r.block_ids for r in self.scheduler.waiting)

    def reset_prefix_cache(self) -> bool:
        return self.kv.reset_prefix_cache()
