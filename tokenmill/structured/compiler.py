"""GrammarCompiler: StructuredOutput -> llguidance grammar, compiled once per constraint.

Compilation (building the LLMatcher, which drops the GIL) runs on a small thread pool; the
result is kept in an LRU cache keyed by the constraint, and each request gets a deep copy,
which is cheap. GrammarMatcher is the per-request state the engine and the sampler use.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance as llg
import numpy as np

from tokenmill.sampling import StructuredOutput

# Compact JSON with the separators json.dumps uses, and no free whitespace: a small model
# left free to emit whitespace can spend its whole budget on newlines.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_text(spec: StructuredOutput) -> str:
    """The llguidance grammar for a constraint (not yet checked; compile() checks it)."""
    kind, text = spec.key
    if kind == "json":
        return llg.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
    if kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(text)
    if kind == "choice":
        return llg.grammar_from("choice", text)
    return llg.grammar_from("grammar", text)  # Lark, or GBNF converted to Lark


class GrammarCompiler:
    """Compiles and caches grammars for one tokenizer. Thread-safe."""

    def __init__(self, tokenizer, vocab_size: int, max_cached: int = 256, num_threads: int = 2):
        # The tokenizer's full JSON (added tokens included) is what llguidance needs.
        self.lltokenizer = llg.LLTokenizer(
            tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=list(tokenizer.eos_token_ids) or None
        )
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(tokenizer.eos_token_ids)
        self.max_cached = max_cached
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="tokenmill-grammar")
        self.num_compiled = 0

    def submit(self, spec: StructuredOutput) -> Future:
        """A future of the compiled template matcher (cached); it raises ValueError if invalid."""
        key = spec.key
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None and not fut.cancelled():  # a cancelled one is compiled anew
                self._cache.move_to_end(key)
                return fut
            fut = self._pool.submit(self._compile, spec)
            self._cache[key] = fut
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
            return fut

    def compile(self, spec: StructuredOutput, timeout: float | None = None) -> llg.LLMatcher:
        return self.submit(spec).result(timeout)

    def validate(self, spec: StructuredOutput) -> None:
        """Raise ValueError naming what is wrong; compiles (and caches) on the way."""
        self.compile(spec)

    def matcher(self, template: llg.LLMatcher) -> GrammarMatcher:
        return GrammarMatcher(template.deep_copy(), self.eos_token_ids)

    def _compile(self, spec: StructuredOutput) -> llg.LLMatcher:
        kind = spec.key[0]
        what = {"json": "JSON schema", "json_object": "JSON schema", "regex": "regex", "choice": "choice",
                "grammar": "grammar"}[kind]
        try:
            grammar = grammar_text(spec)
        except (ValueError, TypeError) as e:
            raise ValueError(f"invalid {what}: {e}") from None
        matcher = llg.LLMatcher(self.lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"invalid {what}: {matcher.get_error().strip()}")
        self.num_compiled += 1
        return matcher

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def allocate_bitmask(rows: int, vocab_size: int) -> np.ndarray:
    """int32 [rows, ceil(vocab / 32)], every token allowed; bit t % 32 of word t // 32 is token t."""
    return np.full((rows, (vocab_size + 31) // 32), -1, dtype=np.int32)


class GrammarMatcher:
    """One request's grammar state: fills its row of the token bitmask, follows each token."""

    def __init__(self, matcher: llg.LLMatcher, eos_token_ids: tuple[int, ...]):
        self.matcher = matcher
        self.eos_token_ids = eos_token_ids

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        """Write the allowed tokens into row `row` of an allocate_bitmask() array."""
        v = bitmask[row]
        self.matcher.unsafe_compute_mask_ptr(v.ctypes.data, v.nbytes)

    def advance(self, token_id: int) -> bool:
        """Consume an accepted token; False if the grammar rejected it (it then stays in error)."""
        return self.matcher.consume_token(token_id)

    @property
    def is_stopped(self) -> bool:
        """The grammar reached its end: nothing but EOS may follow."""
        return self.matcher.is_stopped()

    @property
    def is_accepting(self) -> bool:
        return self.matcher.is_accepting()

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None
