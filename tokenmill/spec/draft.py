"""Draft-model proposer: a smaller model of the same tokenizer guesses k tokens greedily.

Its KV pool has the target's shape in blocks and is indexed by the target's block tables,
so it needs no bookkeeping of its own: every forward the target runs, the draft runs too
(observe), and its KV stays valid exactly where the target's is, through rejections (the
scheduler trims both at once), preemption (recomputed for both) and prefix-cache hits (a
cached block was written by both models). Drafts are greedy, so q is one-hot and the
verification stays exact for sampled requests too (tokenmill/spec/rejection.py).
"""

from __future__ import annotations

import torch

from tokenmill.engine.scheduler import ScheduledChunk, SchedulerOutput
from tokenmill.model.runner import ModelRunner, Segment, decode_first, segment


class DraftModelProposer:
    def __init__(self, runner: ModelRunner, vocab_size: int):
        self.runner = runner
        # Drafts must be ids both models have: embedding tables of one tokenizer's models are
        # padded to different sizes (Qwen2.5-7B 152064 rows, 0.5B 151936).
        self.vocab_size = vocab_size
        self.draft_vocab_size = runner.model.config.vocab_size

    def _known(self, tokens: list[int]) -> list[int]:
        # An id past the draft's table (only a raw-id prompt can hold one) is read as id 0:
        # the draft guesses worse there, the target's output is unaffected.
        v = self.draft_vocab_size
        return [t if t < v else 0 for t in tokens]

    @torch.inference_mode()
    def propose(self, output: SchedulerOutput) -> None:
        active = [c for c in output.chunks if c.num_lookahead]
        drafts: dict[int, list[int]] = {id(c): [] for c in active}
        for i in range(max((c.num_lookahead for c in active), default=0)):
            live = [c for c in active if len(drafts[id(c)]) < c.num_lookahead]
            # Step i feeds the request's last token (i = 0) or the previous draft, at its
            # position; the slots it writes were reserved as lookahead by the scheduler.
            segments = [
                Segment(c.request.block_ids, c.request.num_tokens - 1 + i, self._known([self._last(c, drafts)]))
                for c in live
            ]
            hidden = self.runner.forward(segments)
            logits = self.runner.model.compute_logits(hidden)[:, : self.vocab_size]
            for chunk, token in zip(live, logits.argmax(-1).tolist()):
                drafts[id(chunk)].append(token)
        for chunk in active:
            chunk.draft_token_ids = drafts[id(chunk)]

    @staticmethod
    def _last(chunk: ScheduledChunk, drafts: dict[int, list[int]]) -> int:
        mine = drafts[id(chunk)]
        return mine[-1] if mine else chunk.request.all_token_ids[-1]

    def observe(self, output: SchedulerOutput) -> None:
        # Write the draft's KV for everything the target just computed (prefill chunks,
        # verified tokens); rewriting the slots propose() filled gives the same values.
        segments = [segment(c) for c in decode_first(output)]
        for s in segments:
            s.token_ids = self._known(s.token_ids)
        self.runner.forward(segments)
