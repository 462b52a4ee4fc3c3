"""Draft-model proposer: a smaller model of the same tokenizer guesses k tokens greedily.

Its KV pool has the target's shape in blocks and is indexed by the target's block tables,
so it needs no bookkeeping of its own: every forward the target runs, the draft runs too
(observe), and its KV stays valid exactly where the target's is, through rejections (the
scheduler trims both at once), preemption (recomputed for both) and prefix-cache hits (a
cached block was written by both models). Drafts are greedy, so q is one-hot and the
verification stays exact for sampled requests too (tokenmill/model/rejection.py).
"""

from __future__ import annotations

import torch

from tokenmill.model.runner import ModelRunner, batch_order
from tokenmill.step import DraftRequest, ScheduledSeq, StepRecord


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
    def propose(self, requests: list[DraftRequest]) -> dict[str, list[int]]:
        drafts: dict[str, list[int]] = {r.request_id: [] for r in requests}
        for i in range(max((r.num_lookahead for r in requests), default=0)):
            live = [r for r in requests if len(drafts[r.request_id]) < r.num_lookahead]
            # Step i feeds the request's last token (i = 0) or the previous draft, at its
            # position; the slots it writes were reserved as lookahead by the scheduler.
            segments = [
                ScheduledSeq(r.block_ids, len(r.token_ids) - 1 + i, self._known([(drafts[r.request_id] or r.token_ids)[-1]]))
                for r in live
            ]
            hidden = self.runner.forward(segments)
            logits = self.runner.model.compute_logits(hidden)[:, : self.vocab_size]
            for r, token in zip(live, logits.argmax(-1).tolist()):
                drafts[r.request_id].append(token)
        return drafts

    def observe(self, record: StepRecord) -> None:
        # Write the draft's KV for everything the target just computed (prefill chunks,
        # verified tokens); rewriting the slots propose() filled gives the same values.
        self.runner.forward([
            ScheduledSeq(s.block_ids, s.start, self._known(s.token_ids), s.prompt) for s in batch_order(record.seqs)
        ])
