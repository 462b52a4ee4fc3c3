"""ModelRunner: StepRecord -> input tensors -> forward -> sampled tokens.

Owns the KV pool tensor: [2 (k, v), layers, blocks, kv_heads, block_size, row width], on the
model's device, in the KV dtype (attention/kv_dtype.py: the model's, a 16-bit one, or int8 rows
with their scale). Inputs are built on the host and copied over once per step.
"""

from __future__ import annotations


import torch

from tokenmill.config import ModelConfig
from tokenmill.model.attention import AttentionMetadata, PrefillChunk
from tokenmill.model.attention.kv_dtype import dtype_name, kv_token_bytes, row_width
from tokenmill.model.host import lazy_zeros, to_device
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.profiling import STEP_RANGE, StepProfiler
from tokenmill.model.sampler import Sampler
from tokenmill.outputs import SampleResult
from tokenmill.step import ScheduledSeq, StepRecord

def kv_block_bytes(cfg: ModelConfig, block_size: int, kv_dtype: torch.dtype) -> int:
    return block_size * kv_token_bytes(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, kv_dtype)


class ModelRunner:
    def __init__(
        self, model: LlamaForCausalLM, num_blocks: int, block_size: int, seed: int = 0, kv_dtype: torch.dtype | None = None,
    ):
        cfg = model.config
        kv_dtype = model.dtype if kv_dtype is None else kv_dtype
        self.kv_cache_dtype = dtype_name(kv_dtype)  # reported by the server (/v1/tokenmill/info)
        self.model = model
        self.block_size = block_size
        self.device = model.embed_tokens.device
        # One block past the scheduler's pool: the padding rows of a CUDA-graph batch write there.
        self.scratch_block = num_blocks
        shape = (2, cfg.num_layers, num_blocks + 1, cfg.num_kv_heads, block_size, row_width(cfg.head_dim, kv_dtype))
        # On CPU, pages zeroed by the OS on first touch: nothing to write at start-up (host.py).
        self.kv_caches = (lazy_zeros(shape, kv_dtype) if self.device.type == "cpu"
                          else torch.zeros(shape, dtype=kv_dtype, device=self.device))
        self.sampler = Sampler(seed, self.device)
        self.decode_graphs = None  # tokenmill.model.cuda_graphs.DecodeGraphs, once captured
        self.profiler = StepProfiler()  # traces of the steps, on request (server --profile-dir)

    def execute(self, record: StepRecord) -> dict[str, list[SampleResult]]:
        """Run the step; per request that reached its last token, the tokens it gains: one,
        or with drafts the accepted ones plus one."""
        # A named range in the traces of this runner's profiles (`tokenmill doctor --profile`
        # measures within it). Only while one records: the range costs about 6 us even when no
        # profiler is on, and over 100 us right after a CPU step's weights have swept the caches.
        if not self.profiler.running:
            return self._execute(record)
        with torch.profiler.record_function(STEP_RANGE):
            return self._execute(record)

    def _execute(self, record: StepRecord) -> dict[str, list[SampleResult]]:
        self.sampler.forget(record.finished_request_ids)
        seqs = batch_order(record.seqs)
        hidden = self.forward(seqs)
        plain_rows, plain, verify_rows, verify = [], [], [], []
        offset = 0
        for seq in seqs:
            offset += len(seq.token_ids)
            if seq.sample is None:
                continue
            if seq.num_drafts:
                # The last token's logits check the first draft, each draft's the next one.
                verify_rows.extend(range(offset - seq.num_drafts - 1, offset))
                verify.append(seq)
            else:
                plain_rows.append(offset - 1)
                plain.append(seq)
        if not plain_rows and not verify_rows:
            return {}
        logits = self.model.compute_logits(select_rows(hidden, plain_rows + verify_rows))
        results = {}
        if plain:
            for seq, res in zip(plain, self.sampler(logits[: len(plain)], plain, record.grammar_bitmask)):
                results[seq.request_id] = [res]
        if verify:
            for seq, res in zip(verify, self.sampler.verify(logits[len(plain) :], verify)):
                results[seq.request_id] = res
        return results

    def forward(self, segments: list[ScheduledSeq]) -> torch.Tensor:
        """Hidden states of every token of the segments, in batch_order(): one-token
        generated segments, then other generated ones, then prompt chunks."""
        graphs = self.decode_graphs
        if graphs is not None and graphs.fits(segments):
            return graphs.run(segments)
        input_ids, positions, meta = self._prepare(segments)
        return self.model(input_ids, positions, self.kv_caches, meta)

    def _prepare(self, segments: list[ScheduledSeq]):
        bs = self.block_size
        kinds = [s.prompt for s in segments]
        assert kinds == sorted(kinds), "generated-token segments must precede prompt segments"
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        # Decode rows: the leading one-token segments of generated tokens. A one-token prompt
        # chunk is a prefill chunk here, so it stays among the prompt rows (see batch_order).
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
        return to_device(ids, dev), to_device(pos, dev), meta


def select_rows(hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """hidden[rows] without a host sync: a view when the rows are one ascending run (the usual
    case: one row per request, every chunk sampling), else a gather by an index copied async.
    Indexing a CUDA tensor with a Python list would copy the list over synchronously."""
    if not rows:
        return hidden[:0]
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return hidden[rows[0] : rows[0] + len(rows)]
    return hidden.index_select(0, to_device(rows, hidden.device))


def batch_order(seqs: list[ScheduledSeq]) -> list[ScheduledSeq]:
    """A step's sequences in batch order: decodes (one generated token) first, as attention
    batches them together; then verify chunks (a generated token and its drafts); prompt chunks
    last. (The order changes no row's arithmetic: every kernel computes a row alone.)"""
    return sorted(seqs, key=lambda s: (s.prompt, len(s.token_ids) != 1))
