"""The batched sampler: one call turns a batch's last-position logits into next tokens.

Kept out of tokenmill/sampling.py (which holds SamplingParams) so that the scheduler, which
sees SamplingParams, stays free of torch. It reads only the step record's rows (params,
token history when penalised, grammar bitmask rows), never a live request.
"""

from __future__ import annotations

import torch

from tokenmill.model import qkernels
from tokenmill.model.grammar_mask import apply_bitmask_
from tokenmill.model.host import to_device
from tokenmill.model.rejection import verify_greedy, verify_sampled
from tokenmill.outputs import Logprob, SampleResult, TokenLogprobs
from tokenmill.step import ScheduledSeq


class Sampler:
    """Runs where the logits are (CPU or GPU): only token ids and requested logprobs come back."""

    def __init__(self, seed: int = 0, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        # One generator per seeded request: its draws depend on nothing else in the batch.
        self.request_generators: dict[str, torch.Generator] = {}

    def forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.request_generators.pop(request_id, None)

    def _generator(self, seq: ScheduledSeq) -> torch.Generator | None:
        seed = seq.sample.params.seed
        if seed is None:
            return None
        g = self.request_generators.get(seq.request_id)
        if g is None:
            g = self.request_generators[seq.request_id] = torch.Generator(device=self.device).manual_seed(seed)
        return g

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, requests: list[ScheduledSeq], bitmask=None) -> list[SampleResult]:
        """One token per row; `requests` are the rows' sequences (each with .sample set),
        `bitmask` the step record's grammar bitmask when some row is constrained."""
        if _plain_greedy(requests):
            return [SampleResult(t) for t in greedy_tokens(logits).tolist()]
        logits = logits.float()
        dev = logits.device
        batch, vocab = logits.shape
        raw_logprobs = None
        if any(r.sample.params.logprobs is not None for r in requests):
            raw_logprobs = torch.log_softmax(logits, dim=-1)

        logits = logits.clone()
        constrained = [i for i, r in enumerate(requests) if r.sample.grammar_row is not None]
        if constrained:
            rows = torch.from_numpy(bitmask)[[requests[i].sample.grammar_row for i in constrained]]
            apply_bitmask_(logits, constrained, rows)
        self._apply_penalties(logits, requests)
        self._apply_min_tokens(logits, requests)
        if constrained:
            self._unblock_eos(logits, requests, constrained)

        tokens = greedy_tokens(logits)
        random_rows = [i for i, r in enumerate(requests) if not r.sample.params.greedy]
        if random_rows:
            rows = to_device(random_rows, dev)
            sampled = self._sample(logits[rows], [requests[i] for i in random_rows])
            tokens[rows] = sampled

        token_list = tokens.tolist()
        results = []
        for i, request in enumerate(requests):
            lp = None
            if raw_logprobs is not None and request.sample.params.logprobs is not None:
                lp = _logprobs(raw_logprobs[i], token_list[i], request.sample.params.logprobs)
            results.append(SampleResult(token_list[i], lp))
        return results

    def _unblock_eos(self, logits: torch.Tensor, requests: list[ScheduledSeq], rows: list[int]) -> None:
        # min_tokens may have banned the only token the grammar still allows (EOS): the grammar wins.
        for i in rows:
            eos = requests[i].sample.eos_token_ids
            if torch.isneginf(logits[i]).all() and eos:
                logits[i, list(eos)] = 0.0

    def _apply_penalties(self, logits: torch.Tensor, requests: list[ScheduledSeq]) -> None:
        for i, request in enumerate(requests):
            s = request.sample
            p = s.params
            if not p.needs_penalties:
                continue
            row = logits[i]
            if p.repetition_penalty != 1.0:
                seen = to_device(sorted(set(s.prompt_token_ids) | set(s.output_token_ids)), row.device)
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and s.output_token_ids:
                # bincount would read its input's max back to size the output: count by index_add_.
                ids = to_device(s.output_token_ids, row.device)
                counts = torch.zeros_like(row, dtype=torch.long).index_add_(0, ids, torch.ones_like(ids))
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)

    def _apply_min_tokens(self, logits: torch.Tensor, requests: list[ScheduledSeq]) -> None:
        for i, request in enumerate(requests):
            s = request.sample
            p = s.params
            if s.num_output_tokens < p.min_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(s.eos_token_ids))
                if banned:
                    logits[i].index_fill_(0, to_device(banned, logits.device), float("-inf"))

    @torch.inference_mode()
    def verify(self, logits: torch.Tensor, requests: list[ScheduledSeq]) -> list[list[SampleResult]]:
        """Speculative decoding: rows hold, per request, the logits at its last token and at
        each of its drafts (num_drafts + 1 rows). Returns the accepted drafts plus one token
        of the target's own per request; see tokenmill/model/rejection.py."""
        drafts = [r.draft_token_ids for r in requests]
        sizes = [len(d) + 1 for d in drafts]
        argmax = greedy_tokens(logits).tolist()
        raw_logprobs = None
        probs = {}
        if not _plain_greedy(requests):
            logits = logits.float()
            if any(r.sample.params.logprobs is not None for r in requests):
                raw_logprobs = torch.log_softmax(logits, dim=-1)
            row_requests = [r for r, n in zip(requests, sizes) for _ in range(n)]
            random_rows = [i for i, r in enumerate(row_requests) if not r.sample.params.greedy]
            if random_rows:
                rows = to_device(random_rows, logits.device)
                for i, row in zip(random_rows, self._probs(logits[rows], [row_requests[i] for i in random_rows])):
                    probs[i] = row
        results = []
        start = 0
        for request, draft, n in zip(requests, drafts, sizes):
            if request.sample.params.greedy:
                tokens = verify_greedy(argmax[start : start + n], draft)
            else:
                p = torch.stack([probs[i] for i in range(start, start + n)])
                tokens = verify_sampled(p, draft, None, self._generator(request) or self.generator)
            lp = request.sample.params.logprobs
            results.append([
                SampleResult(t, None if raw_logprobs is None or lp is None else _logprobs(raw_logprobs[start + j], t, lp))
                for j, t in enumerate(tokens)
            ])
            start += n
        return results

    def _probs(self, logits: torch.Tensor, requests: list[ScheduledSeq]) -> torch.Tensor:
        """The distribution each row samples from: temperature, then top-k/top-p, then min-p."""
        dev = logits.device
        params = [r.sample.params for r in requests]
        temps = to_device([p.temperature for p in params], dev, torch.float32).unsqueeze(1)
        logits = logits / temps
        top_k = [p.top_k for p in params]
        top_p = [p.top_p for p in params]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            logits = _top_k_top_p(logits, top_k, top_p)
        probs = logits.softmax(dim=-1)
        if any(p.min_p > 0 for p in params):  # on the host: no read-back
            min_p = to_device([p.min_p for p in params], dev, torch.float32)
            limit = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
            probs = probs.masked_fill(probs < limit, 0.0)
            probs = probs / probs.sum(dim=-1, keepdim=True)  # rejection sampling needs a distribution
        return probs

    def _sample(self, logits: torch.Tensor, requests: list[ScheduledSeq]) -> torch.Tensor:
        probs = self._probs(logits, requests)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws exactly from p, and lets each
        # seeded row take its noise from its own generator.
        noise = torch.empty_like(probs)
        unseeded = []
        for i, request in enumerate(requests):
            g = self._generator(request)
            if g is None:
                unseeded.append(i)
            else:
                noise[i].exponential_(generator=g)
        if unseeded:  # the draws of noise[unseeded] = ..., without a synchronous index copy
            draws = torch.empty(len(unseeded), probs.shape[1], device=probs.device)
            draws.exponential_(generator=self.generator)
            noise.index_copy_(0, to_device(unseeded, probs.device), draws)
        return (probs / noise).argmax(dim=-1)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax, int64. On the CPU in one C++ pass pair (qkernels.greedy_tokens: the same
    indices, a NaN counting as the largest); torch's argmax there walks the row element by
    element, 42 us for one row of a 49,152-token vocabulary and 344 us for 16."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2 and logits.shape[1]:
        module = qkernels.kernel()
        if module is not None:
            return module.greedy_tokens(logits.contiguous())
    return logits.argmax(dim=-1)


def _plain_greedy(requests: list[ScheduledSeq]) -> bool:
    """Rows whose token is the bare argmax: nothing to mask, penalise or report."""
    return all(
        (p := r.sample.params).greedy and r.sample.grammar_row is None and not p.needs_penalties
        and p.logprobs is None and r.sample.num_output_tokens >= p.min_tokens
        for r in requests
    )


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    dev = logits.device
    ranks = torch.arange(vocab, device=dev).unsqueeze(0)
    k = to_device([min(v, vocab) if v > 0 else vocab for v in top_k], dev).unsqueeze(1)
    remove = ranks >= k
    if any(v < 1.0 for v in top_p):  # on the host: no read-back
        p = to_device(top_p, dev, torch.float32).unsqueeze(1)
        probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p (the first stays).
        before = probs.cumsum(dim=-1) - probs
        remove |= before >= p
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _logprobs(row: torch.Tensor, token: int, top_n: int) -> TokenLogprobs:
    sampled = Logprob(token, float(row[token]))
    top = []
    if top_n:
        values, ids = row.topk(top_n)
        top = [Logprob(int(i), float(v)) for v, i in zip(values.tolist(), ids.tolist())]
    return TokenLogprobs(sampled, top)
