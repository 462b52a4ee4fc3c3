"""Prompt lookup: guess that the text continues as it did after the last n-gram's earlier
occurrence (in the prompt or the output so far). No model, so drafts cost almost nothing;
they pay off when the answer copies its input (edits, quotes, code changes)."""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.step import DraftRequest, StepRecord


def find_continuation(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest
    suffix n-gram (max_n down to min_n) that has one; [] when none does."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n :]
        first = suffix[0]
        # Latest occurrence first: the nearest context is the likeliest to be copied next.
        for i in range(length - n - 1, -1, -1):
            if tokens[i] == first and tokens[i : i + n] == suffix:
                return tokens[i + n : i + n + k]
    return []


@dataclass
class NgramProposer:
    min_n: int = 2
    max_n: int = 4

    def propose(self, requests: list[DraftRequest]) -> dict[str, list[int]]:
        return {
            r.request_id: find_continuation(r.token_ids, self.min_n, self.max_n, r.num_lookahead) for r in requests
        }

    def observe(self, record: StepRecord) -> None:
        pass
