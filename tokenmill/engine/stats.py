"""EngineStats: the engine's gauges and counters, read by /metrics and the periodic log line.

The core keeps the gauges true after every add, step, abort and stop (an idle engine must not
report the last busy step's figures); the output processor counts prompt and generated tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    prefix_cache_missed_hits: int = 0  # with caching off: prompt tokens it would have found
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
