"""One request's timeline as the client saw it, and the values derived from it.

Times are seconds from `time.perf_counter()`; the per-request fields mirror vLLM's
RequestFuncOutput so the result JSON lines up with `vllm bench serve`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestRecord:
    prompt_len: int
    expected_output_len: int
    start_time: float = 0.0
    # Send -> first chunk that carries text (role-only or empty chunks do not count).
    ttft: float = 0.0
    # Gaps between consecutive text chunks; a chunk holding several tokens is one gap.
    itl: list[float] = field(default_factory=list)
    # Send -> end of stream.
    latency: float = 0.0
    # Completion tokens: the server's usage when it sends one, else a tokenizer recount.
    output_tokens: int | None = None
    generated_text: str = ""
    error: str = ""
    success: bool = False

    @property
    def end_time(self) -> float:
        return self.start_time + self.latency

    @property
    def output_len(self) -> int:
        """Completion tokens, 0 for a failed request (vLLM's `output_lens` convention)."""
        return (self.output_tokens or 0) if self.success else 0

    @property
    def tpot(self) -> float | None:
        """(E2E - TTFT) / (tokens - 1); undefined for a single-token answer."""
        if not self.success or self.output_len <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_len - 1)

    @property
    def token_times(self) -> list[float]:
        """Absolute arrival time of each text chunk: first chunk, then one per ITL gap."""
        if not self.success:
            return []
        times = [self.start_time + self.ttft]
        for gap in self.itl:
            times.append(times[-1] + gap)
        return times
