"""ModelRunner: SchedulerOutput -> input tensors -> forward -> sampled tokens.

Owns the KV pool tensor: [2 (k, v), layers, blocks, kv_heads, block_size, head_dim], on the
model's device. Inputs are built on the host and copied over once per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.config import ModelConfig
from tokenmill.engine.scheduler import ScheduledChunk, SchedulerOutput
from tokenmill.model.attention import AttentionMetadata, PrefillChunk
from tokenmill.model.host import to_device
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.sampler import SampleResult, Sampler
from tokenmill.model.step_context import StepContext

DTYPE_SIZES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def kv_block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * DTYPE_SIZES[dtype]


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, seed: int = 0):
        cfg = model.config
        self.model = model
        self.block_size = block_size
        self.device = model.embed_tokens.device
        # One block past the scheduler's pool: the padding rows of a CUDA-graph batch write there.
        self.scratch_block = num_blocks
        self.kv_caches = torch.zeros(
            2, cfg.num_layers, num_blocks + 1, cfg.num_kv_heads, block_size, cfg.head_dim,
            dtype=model.dtype, device=self.device,
        )
        self.sampler = Sampler(seed, self.device)
        self.decode_graphs = None  # tokenmill.model.cuda_graphs.DecodeGraphs, once captured

    def execute(self, output: SchedulerOutput) -> dict[str, list[SampleResult]]:
        """Run the step; per request that reached its last token, the tokens it gains: one,
        or with drafts the accepted ones plus one."""
        chunks = decode_first(output)
        hidden = self.forward([segment(c) for c in chunks])
        plain_rows, plain, verify_rows, verify = [], [], [], []
        offset = 0
        for chunk in chunks:
            offset += chunk.num_scheduled
            if not chunk.samples:
                continue
            if chunk.draft_token_ids:
                # The last token's logits check the first draft, each draft's the next one.
                verify_rows.extend(range(offset - len(chunk.draft_token_ids) - 1, offset))
                verify.append(chunk)
            else:
                plain_rows.append(offset - 1)
                plain.append(chunk.request)
        if not plain_rows and not verify_rows:
            return {}
        logits = self.model.compute_logits(select_rows(hidden, plain_rows + verify_rows))
        results = {}
        if plain:
            for request, res in zip(plain, self.sampler(logits[: len(plain)], plain)):
                results[request.request_id] = [res]
        if verify:
            requests = [c.request for c in verify]
            verified = self.sampler.verify(logits[len(plain) :], requests, [c.draft_token_ids for c in verify])
            for request, res in zip(requests, verified):
                results[request.request_id] = res
        return results

    def forward(self, segments: list[Segment]) -> torch.Tensor:
        """Hidden states of every token of the segments, in decode_first()'s order: one-token
        generated segments, then other generated ones, then prompt chunks."""
        graphs = self.decode_graphs
        if graphs is not None and graphs.fits(segments):
            return graphs.run(segments)
        input_ids, positions, meta, step = self._prepare(segments)
        return self.model(input_ids, positions, self.kv_caches, meta, step)

    def _prepare(self, segments: list[Segment]):
        bs = self.block_size
        kinds = [s.prompt for s in segments]
        assert kinds == sorted(kinds), "generated-token segments must precede prompt segments"
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        # Decode rows: the leading one-token segments of generated tokens. A one-token prompt
        # chunk is a prefill chunk here, so it stays among the prompt rows (see decode_first).
        nd = 0
        while nd < len(segments) and len(segments[nd].token_ids) == 1 and not segments[nd].prompt:
            nd += 1
        decodes = segments[:nd]
        for s in segments:
            ids.extend(s.token_ids)
            pos.extend(range(s.start, s.end))
            table = s.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in range(s.start, s.end))

        dev = self.device
        decode_tables = ctx = None
        if decodes:
            max_blocks = max(len(s.block_ids) for s in decodes)
            decode_tables = torch.tensor([s.block_ids + [0] * (max_blocks - len(s.block_ids)) for s in decodes])
            ctx = torch.tensor([s.end for s in decodes])
            decode_tables, ctx = to_device(decode_tables, dev), to_device(ctx, dev)

        prefills = []
        offset = len(decodes)
        for s in segments[nd:]:
            table = torch.tensor(s.block_ids[: -(-s.end // bs)])
            prefills.append(PrefillChunk(offset, len(s.token_ids), s.end, table))
            offset += len(s.token_ids)

        meta = AttentionMetadata(
            slot_mapping=to_device(slots, dev),
            num_decodes=len(decodes),
            decode_block_tables=decode_tables,
            decode_context_lens=ctx,
            prefills=prefills,
        )
        step = StepContext(first_prompt_row=sum(len(s.token_ids) for s in segments if not s.prompt))
        return to_device(ids, dev), to_device(pos, dev), meta, step


@dataclass
class Segment:
    """Consecutive tokens of one sequence to run, from position `start`, through its blocks."""

    block_ids: list[int]
    start: int
    token_ids: list[int]
    # A chunk that starts in the prompt (a recompute after preemption included): its rows run
    # the quantized linears' dense copies. Decided by where the chunk starts, so a recompute
    # chunk's generated tokens may run either kernel: within float tolerance, not bit-exact.
    prompt: bool = False

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


def select_rows(hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """hidden[rows] without a host sync: a view when the rows are one ascending run (the usual
    case: one row per request, every chunk sampling), else a gather by an index copied async.
    Indexing a CUDA tensor with a Python list would copy the list over synchronously."""
    if not rows:
        return hidden[:0]
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return hidden[rows[0] : rows[0] + len(rows)]
    return hidden.index_select(0, to_device(rows, hidden.device))


def decode_first(output: SchedulerOutput) -> list[ScheduledChunk]:
    """A step's chunks in batch order: decodes (one generated token) first, as attention
    batches them together; then verify chunks (a generated token and its drafts); prompt chunks
    last, as quantized linears run every row from the first prompt row on through their dense
    copies (AttentionMetadata.dense_from)."""
    return sorted(output.chunks, key=lambda c: (_is_prompt(c), c.num_scheduled != 1))


def _is_prompt(chunk: ScheduledChunk) -> bool:
    return chunk.start < chunk.request.num_prompt_tokens


def segment(chunk: ScheduledChunk) -> Segment:
    tokens = chunk.request.tokens_slice(chunk.start, chunk.end) + chunk.draft_token_ids
    return Segment(chunk.request.block_ids, chunk.start, tokens, _is_prompt(chunk))
