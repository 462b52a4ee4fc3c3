"""CUDA graphs for decode-only steps: the whole forward of a padded batch replayed as one launch.

A decode step of a small model is dozens of tiny kernels per layer; launched one by one from
Python, the GPU waits on the host. Capturing the forward once per batch size in a ladder and
replaying it removes that. Inputs live in static buffers that each step overwrites; a batch is
padded up to the next captured size with rows that see no keys (context length 0) and write
their K/V into the runner's scratch block, so they touch no request's cache. Needs an
attention backend whose launches depend only on shapes (`graph_capturable`: the Triton one; the
block-table width is fixed at the longest context, so the grid never changes).

`capture=False` runs the same padded static-buffer path eagerly: how the CPU tests check the
padding logic, since CUDA graphs themselves need a GPU.
"""

from __future__ import annotations

import logging
import time

import torch

from tokenmill.model.attention import AttentionMetadata

log = logging.getLogger("tokenmill")


def batch_ladder(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to max_batch (vLLM's shape): padding wastes < 8 rows."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8)) + [max_batch]
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(self, runner, max_batch: int, max_blocks_per_seq: int, capture: bool = True):
        # What the runner owns is referenced, not the runner: runner.decode_graphs -> self ->
        # runner would be a cycle that keeps the KV pool alive until the GC runs.
        self.model, self.kv_caches, self.device = runner.model, runner.kv_caches, runner.device
        self.block_size = runner.block_size
        self.sizes = batch_ladder(max_batch)
        self.max_batch = max_batch
        self.max_blocks = max_blocks_per_seq
        dev = runner.device
        self.scratch_slot = runner.scratch_block * runner.block_size
        self.ids = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.slots = torch.full((max_batch,), self.scratch_slot, dtype=torch.long, device=dev)
        self.tables = torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.long, device=dev)
        self.lens = torch.zeros(max_batch, dtype=torch.long, device=dev)
        # Host-side staging, allocated once and filled in place each step: ids, positions,
        # slots, lens as the rows of `host_rows`, and the block tables. Pinned on CUDA so the
        # copies into the static buffers run async instead of blocking the host. Overwriting
        # them next step is safe: every step ends with the sampled-token read-back, which waits
        # for this step's copies to have run. (`copied` guards a step that returns no token:
        # waiting on it is free once the read-back has happened.)
        pin = torch.device(dev).type == "cuda"
        self.host_rows = torch.zeros(4, max_batch, dtype=torch.long, pin_memory=pin)
        self.host_tables_t = torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.long, pin_memory=pin)
        self.host_tables = self.host_tables_t.numpy()  # the same memory, for row-wise fills
        self.copied = torch.cuda.Event() if pin else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture()

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:b], num_decodes=b, decode_block_tables=self.tables[:b],
            decode_context_lens=self.lens[:b], prefills=[],
        )

    @torch.inference_mode()
    def _capture(self) -> None:
        t0 = time.perf_counter()
        model, kv = self.model, self.kv_caches
        pool = None
        for b in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
            meta = self._meta(b)
            model(self.ids[:b], self.positions[:b], kv, meta)  # warm-up: Triton compiles, cuBLAS picks
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[b] = model(self.ids[:b], self.positions[:b], kv, meta)
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize()
        log.info("CUDA graphs: %d decode batch sizes (1..%d) captured in %.1f s",
                 len(self.sizes), self.max_batch, time.perf_counter() - t0)

    def fits(self, segments) -> bool:
        return 0 < len(segments) <= self.max_batch and all(
            len(s.token_ids) == 1 and len(s.block_ids) <= self.max_blocks for s in segments
        )

    @torch.inference_mode()
    def run(self, segments) -> torch.Tensor:
        n = len(segments)
        b = next(size for size in self.sizes if size >= n)
        bs = self.block_size
        if self.copied is not None:
            self.copied.synchronize()  # last step's copies out of the staging buffers are done
        ids, pos, slots, lens = [], [], [], []
        for i, s in enumerate(segments):
            p = s.start
            ids.append(s.token_ids[0])
            pos.append(p)
            slots.append(s.block_ids[p // bs] * bs + p % bs)
            lens.append(p + 1)
            self.host_tables[i, : len(s.block_ids)] = s.block_ids
        rows = self.host_rows[:, :b]
        rows[:, :n] = torch.tensor([ids, pos, slots, lens], dtype=torch.long)
        rows[:, n:] = 0
        rows[2, n:] = self.scratch_slot  # padding rows write their K/V into the scratch block
        self.ids[:b].copy_(rows[0], non_blocking=True)
        self.positions[:b].copy_(rows[1], non_blocking=True)
        self.slots[:b].copy_(rows[2], non_blocking=True)
        self.lens[:b].copy_(rows[3], non_blocking=True)
        self.tables[:n].copy_(self.host_tables_t[:n], non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        if self.graphs:
            self.graphs[b].replay()
            return self.outputs[b][:n]
        return self.model(self.ids[:b], self.positions[:b], self.kv_caches, self._meta(b))[:n]
