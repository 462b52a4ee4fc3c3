"""What the engine hands back: cumulative per-request outputs (vLLM's shape), and the sampled
tokens' logprobs the model runner produces. Top-level: the runner, the engine and the server
all speak it, and none of them owns it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    token_id: int
    logprob: float
    decoded: str = ""


@dataclass
class TokenLogprobs:
    """The sampled token's logprob plus the top-N alternatives at that position."""

    sampled: Logprob
    top: list[Logprob] = field(default_factory=list)


@dataclass
class SampleResult:
    """One token the model runner sampled (or accepted from a draft), with its logprobs."""

    token_id: int
    logprobs: TokenLogprobs | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    metrics: "RequestMetrics | None" = None


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (seconds, time.monotonic) taken by the engine loop, never the core."""

    arrival_time: float
    scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
