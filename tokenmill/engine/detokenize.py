"""Incremental detokenization with stop strings.

Text is produced by decoding a short window of recent tokens, so a multi-byte UTF-8
character split across tokens is held back (it decodes to U+FFFD) until it is complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.model.tokenizer import Tokenizer

# Tokens decoded before the new ones, so that spacing and merges at the seam are right.
_CONTEXT_TOKENS = 6


@dataclass
class IncrementalDetokenizer:
    tokenizer: Tokenizer
    prompt_token_ids: list[int]
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    stop_reason: str | None = None

    def __post_init__(self) -> None:
        # The window starts inside the prompt so the first generated token gets its leading
        # space (or lack of one) right.
        self.token_ids = list(self.prompt_token_ids[-_CONTEXT_TOKENS:])
        self.read_offset = len(self.token_ids)
        self.prefix_offset = max(0, self.read_offset - _CONTEXT_TOKENS)

    @property
    def visible_text(self) -> str:
        """Text safe to show before the request ends: a tail that could still grow into a stop
        string is held back, so streamed text never has to be taken back."""
        if not self.stop:
            return self.text
        hold = max(len(s) for s in self.stop) - 1
        return self.text[: max(0, len(self.text) - hold)]

    def add_token(self, token_id: int) -> bool:
        """Append one token; returns True if a stop string ended the text."""
        self.token_ids.append(token_id)
        prefix = self.tokenizer.decode(
            self.token_ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip_special_tokens
        )
        full = self.tokenizer.decode(self.token_ids[self.prefix_offset :], skip_special_tokens=self.skip_special_tokens)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False  # nothing new yet, or an incomplete UTF-8 sequence
        new_text = full[len(prefix) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        old_len = len(self.text)
        self.text += new_text
        return self._check_stop(old_len)

    def _check_stop(self, old_len: int) -> bool:
        if not self.stop:
            return False
        longest = max(len(s) for s in self.stop)
        # Only look where a stop string could newly end: it may begin just before the new text.
        search_from = max(0, old_len - longest + 1)
        best = None
        for s in self.stop:
            i = self.text.find(s, search_from)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        self.stop_reason = s
        self.text = self.text[: i + len(s)] if self.include_stop_str_in_output else self.text[:i]
        return True
