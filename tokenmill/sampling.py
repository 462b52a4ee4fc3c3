"""SamplingParams: what a user may ask of one request, validated at the door."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

MAX_N = 128  # choices per request: each is a sequence in the batch
MAX_LOGPROBS = 20  # top logprobs per token (OpenAI's top_logprobs bound)
# A regex, grammar or choice list's text, or a JSON schema's JSON text. llguidance bounds the
# compile work itself; this bounds the parsing and hashing done before it, per request.
MAX_CONSTRAINT_CHARS = 64 * 1024


@dataclass(frozen=True)
class StructuredOutput:
    """One output constraint; exactly one field is set. Compiled by tokenmill.structured."""

    json: dict | str | None = None  # a JSON schema (object or its JSON text)
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None  # Lark, or GBNF/EBNF (llguidance converts it)

    def __post_init__(self) -> None:
        if self.choice is not None:
            choice = tuple(self.choice)
            if not choice or any(not isinstance(c, str) for c in choice):
                raise ValueError("choice must be a non-empty list of strings")
            object.__setattr__(self, "choice", choice)
        set_ = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        if self.json_object:
            set_.append("json_object")
        if len(set_) != 1:
            raise ValueError(f"exactly one structured output constraint must be given, got {set_ or 'none'}")
        if isinstance(self.json, str):
            try:
                schema = json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"json schema is not valid JSON: {e}") from None
            object.__setattr__(self, "json", schema)
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError("json schema must be a JSON object")
        size = len(self.key[1])
        if size > MAX_CONSTRAINT_CHARS:
            raise ValueError(f"the constraint is {size} characters long; the limit is {MAX_CONSTRAINT_CHARS}")

    @property
    def key(self) -> tuple[str, str]:
        """(kind, canonical text): what compiled grammars are cached by."""
        if self.json is not None:
            return "json", json.dumps(self.json, separators=(",", ":"))  # key order matters: it is the output order
        if self.json_object:
            return "json_object", ""
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", json.dumps(list(self.choice))
        return "grammar", self.grammar


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None: up to the model's context length
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs besides the sampled token's
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        _check("n", self.n, 1, MAX_N)
        if self.max_tokens is not None:
            _check("max_tokens", self.max_tokens, 1, None)
        _check("min_tokens", self.min_tokens, 0, self.max_tokens)
        _check("temperature", self.temperature, 0.0, 100.0)
        _check("top_p", self.top_p, 0.0, 1.0)
        _check("repetition_penalty", self.repetition_penalty, 0.0, 100.0)
        if self.seed is not None and not (isinstance(self.seed, int) and -(2**63) <= self.seed < 2**63):
            raise ValueError(f"seed must be a 64-bit integer, got {self.seed!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k != -1:
            _check("top_k", self.top_k, 1, None)
        _check("min_p", self.min_p, 0.0, 1.0)
        _check("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if not 0.0 < self.repetition_penalty <= 100.0:
            raise ValueError(f"repetition_penalty must be in (0, 100], got {self.repetition_penalty}")
        if self.logprobs is not None:
            _check("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            _check("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative integers")
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise ValueError("structured must be a StructuredOutput")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


def _check(name: str, value, lo, hi) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < lo or (hi is not None and value > hi):
        upper = "inf" if hi is None else hi
        raise ValueError(f"{name} must be in [{lo}, {upper}], got {value}")
