"""ModelRunner: SchedulerOutput -> input tensors -> forward -> sampled tokens.

Owns the KV pool tensor: [2 (k, v), layers, blocks, kv_heads, block_size, head_dim].
"""

from __future__ import annotations

import torch

from tokenmill.config import ModelConfig
from tokenmill.engine.scheduler import ScheduledChunk, SchedulerOutput
from tokenmill.model.attention import AttentionMetadata, PrefillChunk
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.sampler import SampleResult, Sampler

DTYPE_SIZES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def kv_block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * DTYPE_SIZES[dtype]


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, seed: int = 0):
        cfg = model.config
        self.model = model
        self.block_size = block_size
        self.kv_caches = torch.zeros(
            2, cfg.num_layers, num_blocks, cfg.num_kv_heads, block_size, cfg.head_dim, dtype=model.dtype
        )
        self.sampler = Sampler(seed)

    def execute(self, output: SchedulerOutput) -> dict[str, SampleResult]:
        # Decode-shaped chunks (one token) first: attention batches them together.
        chunks = sorted(output.chunks, key=lambda c: c.num_tokens != 1)
        input_ids, positions, meta = self._prepare(chunks)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        sample_rows, requests = [], []
        offset = 0
        for chunk in chunks:
            offset += chunk.num_tokens
            if chunk.samples:
                sample_rows.append(offset - 1)
                requests.append(chunk.request)
        if not requests:
            return {}
        logits = self.model.compute_logits(hidden[sample_rows])
        results = self.sampler(logits, requests)
        return {r.request_id: res for r, res in zip(requests, results)}

    def _prepare(self, chunks: list[ScheduledChunk]):
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        decodes = [c for c in chunks if c.num_tokens == 1]
        for c in chunks:
            request, start, end = c.request, c.start, c.end
            ids.extend(request.tokens_slice(start, end))
            pos.extend(range(start, end))
            table = request.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))

        decode_tables = decode_mask = None
        if decodes:
            max_blocks = max(len(c.request.block_ids) for c in decodes)
            decode_tables = torch.tensor(
                [c.request.block_ids + [0] * (max_blocks - len(c.request.block_ids)) for c in decodes]
            )
            ctx = torch.tensor([c.end for c in decodes])
            decode_mask = (torch.arange(max_blocks * bs)[None, :] >= ctx[:, None])[:, None, None, :]

        prefills = []
        offset = len(decodes)
        for c in chunks[len(decodes) :]:
            table = torch.tensor(c.request.block_ids[: -(-c.end // bs)])
            prefills.append(PrefillChunk(offset, c.num_tokens, c.end, table))
            offset += c.num_tokens

        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots),
            num_decodes=len(decodes),
            decode_block_tables=decode_tables,
            decode_mask=decode_mask,
            prefills=prefills,
        )
        return torch.tensor(ids), torch.tensor(pos), meta
