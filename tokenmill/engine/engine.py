"""Engine: requests in, cumulative outputs out.

Three parts, each on one side of a typed boundary: input processing here (tokenize, validate,
fan n > 1 out into core requests), the EngineCore (schedule -> execute -> update over token
ids), and the OutputProcessor (text, stop strings, fan-in, timestamps from the injected clock).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from tokenmill.config import EngineConfig
from tokenmill.engine.core import EngineCore, Executor, Proposer
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.request import Request
from tokenmill.engine.stats import EngineStats
from tokenmill.engine.step_log import StepLog
from tokenmill.outputs import RequestOutput
from tokenmill.sampling import SamplingParams


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later (HTTP 429)."""


def failure_of(out: RequestOutput) -> str | None:
    """Why a request failed (a completion finished with "error"), or None."""
    return next((str(c.stop_reason) for c in out.outputs if c.finish_reason == "error"), None)


class Engine:
    def __init__(
        self, config: EngineConfig, executor: Executor, tokenizer, max_model_len: int, num_blocks: int,
        vocab_size: int, proposer: Proposer | None = None, clock: Callable[[], float] = time.monotonic,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.clock = clock
        self.stats = EngineStats()
        self.core = EngineCore(config, executor, num_blocks, max_model_len, vocab_size, tokenizer, proposer, self.stats)
        self.outputs = OutputProcessor(tokenizer, self.stats, clock)
        self._arrivals = 0
        self._added = 0  # requests taken in (the step log counts those since the last step)
        self._added_by_last_step = 0
        self.step_log = StepLog(config.runtime.step_log) if config.runtime.step_log else None

    # The core's parts, for the offline API, benchmarks and tests.
    @property
    def kv(self):
        return self.core.kv

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def runner(self):
        return self.core.executor

    @property
    def grammars(self):
        return self.core.grammars

    # -- requests ------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, arrival_time: float | None = None,
        priority: int = 0,
    ) -> None:
        """Never waits: a grammar still compiling holds its request outside the scheduler. A
        grammar already known to be invalid is refused here (ValueError). `priority`: a lower
        value is scheduled first (vLLM's convention)."""
        if request_id in self.outputs.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        if self.core.num_waiting + params.n > self.config.scheduler.max_waiting_requests:
            raise QueueFullError(f"the waiting queue is full ({self.config.scheduler.max_waiting_requests} requests)")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
            if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in ids):
                raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(ids)
        if max_tokens < 1:
            raise ValueError(f"the prompt ({len(ids)} tokens) leaves no room in the context ({self.max_model_len})")
        grammar = None
        if params.structured is not None:
            grammar = self.grammars.submit(params.structured)
            if grammar.done():
                grammar.result()  # raises ValueError naming what is wrong
        children = [self._child(request_id, ids, params, max_tokens, j, priority) for j in range(params.n)]
        for child in children:
            self.core.scheduler.check_admissible(child)
        self.outputs.add(
            request_id, text, ids, [c.request_id for c in children], params,
            arrival_time if arrival_time is not None else self.clock(),
        )
        for child in children:
            self.core.add_request(child, grammar)
        self._added += 1

    def _child(
        self, request_id: str, ids: list[int], params: SamplingParams, max_tokens: int, j: int, priority: int = 0
    ) -> Request:
        """The j-th of n core requests sharing the prompt; each gets its own seed."""
        if params.n > 1:
            seed = None if params.seed is None else params.seed + j
            params = dataclasses.replace(params, n=1, seed=seed)
            request_id = f"{request_id}#{j}"
        self._arrivals += 1
        return Request(
            request_id=request_id, prompt_token_ids=ids, params=params, arrival_order=self._arrivals - 1,
            max_tokens=max_tokens, eos_token_ids=tuple(self.tokenizer.eos_token_ids) if self.tokenizer is not None else (),
            priority=priority,
        )

    def abort_request(self, request_id: str) -> RequestOutput | None:
        out, core_ids = self.outputs.abort(request_id)
        for core_id in core_ids:
            self.core.abort(core_id)
        return out

    @property
    def has_unfinished(self) -> bool:
        return self.outputs.has_unfinished

    # -- one step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t0 = self.clock()
        wall = time.time() if self.step_log is not None else 0.0
        num_steps = self.stats.num_steps
        outputs, stopped = self.outputs.process(self.core.step())
        for core_id in stopped:
            self.core.stop(core_id)
        outputs = [self._end_failed(out) for out in outputs]
        if self.stats.num_steps != num_steps:
            self.stats.last_step_seconds = self.clock() - t0
            if self.step_log is not None and self.core.last_record is not None:
                self.step_log.write(wall, self.stats.last_step_seconds, self.core.last_record,
                                    self._added - self._added_by_last_step)
            self._added_by_last_step = self._added
        if self.config.runtime.debug_checks:
            self.core.check_invariants()
        return outputs

    def _end_failed(self, out: RequestOutput) -> RequestOutput:
        """A completion that failed (finish_reason "error") fails its whole request: the
        caller gets an error, not n - 1 answers, so its siblings are aborted now."""
        if out.finished or failure_of(out) is None:
            return out
        return self.abort_request(out.request_id) or out

    def check_invariants(self) -> None:
        self.core.check_invariants()

    def reset_prefix_cache(self) -> bool:
        return self.core.reset_prefix_cache()

    # The executor's profiler (the model runner's), driven between steps on the engine thread.
    def start_profile(self) -> None:
        self.runner.profiler.start()

    def stop_profile(self, directory: str) -> str:
        return str(self.runner.profiler.stop(directory))
