"""OutputProcessor: the core's token ids -> what callers see (text, stop strings, n > 1 fan-in,
logprobs, metrics timestamps).

The other side of the core's boundary: it holds one group per user request (n > 1 fans out to
n core requests that share the prompt), an incremental detokenizer per completion, and the
request's timestamps, taken with an injected clock. A stop string found here ends the request
in the core too: process() returns those ids for the engine to stop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tokenmill.engine.core import CoreOutput
from tokenmill.engine.detokenize import IncrementalDetokenizer
from tokenmill.engine.stats import EngineStats
from tokenmill.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprobs
from tokenmill.sampling import SamplingParams


@dataclass
class _Completion:
    """One of a group's n sequences, as the caller sees it."""

    request_id: str  # the core's id for it
    detok: IncrementalDetokenizer
    want_logprobs: bool
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = -1

    def output(self, index: int) -> CompletionOutput:
        d = self.detok
        return CompletionOutput(
            index=index,
            text=d.text if self.finish_reason else d.visible_text,
            token_ids=list(self.token_ids),
            logprobs=list(self.logprobs) if self.want_logprobs else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


@dataclass
class _Group:
    """One user request."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    completions: list[_Completion]
    metrics: RequestMetrics

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions)

    def output(self) -> RequestOutput:
        cached = max(0, min(c.num_cached_tokens for c in self.completions))
        return RequestOutput(
            self.request_id, self.prompt, self.prompt_token_ids, [c.output(j) for j, c in enumerate(self.completions)],
            finished=self.finished, num_cached_tokens=cached, metrics=self.metrics,
        )


class OutputProcessor:
    def __init__(self, tokenizer, stats: EngineStats, clock: Callable[[], float]):
        self.tokenizer = tokenizer
        self.stats = stats
        self.clock = clock
        self.groups: dict[str, _Group] = {}
        self._by_core_id: dict[str, tuple[_Group, _Completion]] = {}

    @property
    def has_unfinished(self) -> bool:
        return bool(self.groups)

    def add(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int], core_ids: list[str],
        params: SamplingParams, arrival_time: float,
    ) -> None:
        completions = [
            _Completion(core_id, IncrementalDetokenizer(
                self.tokenizer, prompt_token_ids, params.stop, params.include_stop_str_in_output,
                params.skip_special_tokens,
            ), params.logprobs is not None)
            for core_id in core_ids
        ]
        group = _Group(request_id, prompt, prompt_token_ids, completions, RequestMetrics(arrival_time=arrival_time))
        self.groups[request_id] = group
        for c in completions:
            self._by_core_id[c.request_id] = (group, c)

    def abort(self, request_id: str) -> tuple[RequestOutput | None, list[str]]:
        """End a group: its output, and the core ids of all its completions. All, not only the
        unfinished: one a stop string ended here may not have been stopped in the core yet (a
        step that failed in between), and aborting a finished core request does nothing."""
        group = self.groups.get(request_id)
        if group is None:
            return None, []
        for c in group.completions:
            if c.finish_reason is None:
                c.finish_reason = "abort"
        return self._finish(group), [c.request_id for c in group.completions]

    def process(self, outputs: list[CoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """The step's outputs per touched group, and the core ids a stop string ended."""
        now = self.clock()
        touched: dict[str, _Group] = {}
        stopped: list[str] = []
        for out in outputs:
            group, c = self._by_core_id[out.request_id]
            # Every scheduled request has its prefix-cache hit set (>= 0); a request that ended
            # before it was ever scheduled (its grammar failed to compile) has not.
            if group.metrics.scheduled_time is None and out.num_cached_tokens >= 0:
                group.metrics.scheduled_time = now
            c.num_cached_tokens = out.num_cached_tokens
            if not out.new_token_ids and out.finish_reason is None:
                continue  # a prompt chunk that did not reach the end: nothing to show yet
            touched[group.request_id] = group
            if out.new_token_ids and group.metrics.first_token_time is None:
                group.metrics.first_token_time = now
                self.stats.prompt_tokens_total += len(group.prompt_token_ids)
            if self._add_tokens(c, out):
                stopped.append(c.request_id)
            elif out.finish_reason is not None:
                c.finish_reason, c.stop_reason = out.finish_reason, out.stop_reason
        results = [self._finish(g) if g.finished else g.output() for g in touched.values()]
        return results, stopped

    def _add_tokens(self, c: _Completion, out: CoreOutput) -> bool:
        """Append the new tokens up to a stop string; True when one ended the completion (the
        tokens after it are dropped)."""
        for token, logprobs in zip(out.new_token_ids, out.new_logprobs):
            self.stats.generation_tokens_total += 1
            c.token_ids.append(token)
            if logprobs is not None:
                c.logprobs.append(logprobs)
            if c.detok.add_token(token):
                c.finish_reason, c.stop_reason = "stop", c.detok.stop_reason
                return True
        return False

    def _finish(self, group: _Group) -> RequestOutput:
        group.metrics.finished_time = self.clock()
        for c in group.completions:
            self._by_core_id.pop(c.request_id, None)
        self.groups.pop(group.request_id, None)
        return group.output()
