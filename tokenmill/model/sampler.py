"""The batched sampler: one call turns a batch's last-position logits into next tokens.

Kept out of tokenmill/sampling.py (which holds SamplingParams) so that the scheduler, which
sees SamplingParams, stays free of torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.outputs import Logprob, TokenLogprobs
from tokenmill.engine.request import Request
from tokenmill.model.host import to_device
from tokenmill.spec.rejection import verify_greedy, verify_sampled
from tokenmill.structured.mask import allocate_bitmask, apply_bitmask_


@dataclass
class SampleResult:
    token_id: int
    logprobs: TokenLogprobs | None = None


class Sampler:
    """Runs where the logits are (CPU or GPU): only token ids and requested logprobs come back."""

    def __init__(self, seed: int = 0, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        # One generator per seeded request: its draws depend on nothing else in the batch.
        self.request_generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self.request_generators.pop(request_id, None)

    def _generator(self, request: Request) -> torch.Generator | None:
        seed = request.params.seed
        if seed is None:
            return None
        g = self.request_generators.get(request.request_id)
        if g is None:
            g = self.request_generators[request.request_id] = torch.Generator(device=self.device).manual_seed(seed)
        return g

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> list[SampleResult]:
        if _plain_greedy(requests):
            return [SampleResult(t) for t in logits.argmax(dim=-1).tolist()]
        logits = logits.float()
        dev = logits.device
        batch, vocab = logits.shape
        raw_logprobs = None
        if any(r.params.logprobs is not None for r in requests):
            raw_logprobs = torch.log_softmax(logits, dim=-1)

        logits = logits.clone()
        constrained = [i for i, r in enumerate(requests) if r.grammar is not None]
        if constrained:
            self._apply_grammar(logits, requests, constrained)
        self._apply_penalties(logits, requests)
        self._apply_min_tokens(logits, requests)
        if constrained:
            self._unblock_eos(logits, requests, constrained)

        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        if random_rows:
            rows = to_device(random_rows, dev)
            sampled = self._sample(logits[rows], [requests[i] for i in random_rows])
            tokens[rows] = sampled

        token_list = tokens.tolist()
        results = []
        for i, request in enumerate(requests):
            lp = None
            if raw_logprobs is not None and request.params.logprobs is not None:
                lp = _logprobs(raw_logprobs[i], token_list[i], request.params.logprobs)
            results.append(SampleResult(token_list[i], lp))
        return results

    def _apply_grammar(self, logits: torch.Tensor, requests: list[Request], rows: list[int]) -> None:
        """Constrained rows keep only the tokens their grammar allows next (EOS once it accepts)."""
        bitmask = allocate_bitmask(len(rows), logits.shape[1])
        for k, i in enumerate(rows):
            requests[i].grammar.fill_bitmask(bitmask, k)
        apply_bitmask_(logits, rows, bitmask)

    def _unblock_eos(self, logits: torch.Tensor, requests: list[Request], rows: list[int]) -> None:
        # min_tokens may have banned the only token the grammar still allows (EOS): the grammar wins.
        for i in rows:
            if torch.isneginf(logits[i]).all() and requests[i].eos_token_ids:
                logits[i, list(requests[i].eos_token_ids)] = 0.0

    def _apply_penalties(self, logits: torch.Tensor, requests: list[Request]) -> None:
        for i, request in enumerate(requests):
            p = request.params
            if not p.needs_penalties:
                continue
            row = logits[i]
            if p.repetition_penalty != 1.0:
                seen = to_device(sorted(set(request.all_token_ids)), row.device)
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and request.output_token_ids:
                # bincount would read its input's max back to size the output: count by index_add_.
                ids = to_device(request.output_token_ids, row.device)
                counts = torch.zeros_like(row, dtype=torch.long).index_add_(0, ids, torch.ones_like(ids))
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)

    def _apply_min_tokens(self, logits: torch.Tensor, requests: list[Request]) -> None:
        for i, request in enumerate(requests):
            p = request.params
            if request.num_output_tokens < p.min_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(request.eos_token_ids))
                if banned:
                    logits[i].index_fill_(0, to_device(banned, logits.device), float("-inf"))

    @torch.inference_mode()
    def verify(
        self, logits: torch.Tensor, requests: list[Request], drafts: list[list[int]]
    ) -> list[list[SampleResult]]:
        """Speculative decoding: rows hold, per request, the logits at its last token and at
        each of its drafts (len(drafts) + 1 rows). Returns the accepted drafts plus one token
        of the target's own per request; see tokenmill/spec/rejection.py."""
        sizes = [len(d) + 1 for d in drafts]
        argmax = logits.argmax(dim=-1).tolist()
        raw_logprobs = None
        probs = {}
        if not _plain_greedy(requests):
            logits = logits.float()
            if any(r.params.logprobs is not None for r in requests):
                raw_logprobs = torch.log_softmax(logits, dim=-1)
            row_requests = [r for r, n in zip(requests, sizes) for _ in range(n)]
            random_rows = [i for i, r in enumerate(row_requests) if not r.params.greedy]
            if random_rows:
                rows = to_device(random_rows, logits.device)
                for i, row in zip(random_rows, self._probs(logits[rows], [row_requests[i] for i in random_rows])):
                    probs[i] = row
        results = []
        start = 0
        for request, draft, n in zip(requests, drafts, sizes):
            if request.params.greedy:
                tokens = verify_greedy(argmax[start : start + n], draft)
            else:
                p = torch.stack([probs[i] for i in range(start, start + n)])
                tokens = verify_sampled(p, draft, None, self._generator(request) or self.generator)
            lp = request.params.logprobs
            results.append([
                SampleResult(t, None if raw_logprobs is None or lp is None else _logprobs(raw_logprobs[start + j], t, lp))
                for j, t in enumerate(tokens)
            ])
            start += n
        return results

    def _probs(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """The distribution each row samples from: temperature, then top-k/top-p, then min-p."""
        dev = logits.device
        temps = to_device([r.params.temperature for r in requests], dev, torch.float32).unsqueeze(1)
        logits = logits / temps
        top_k = [r.params.top_k for r in requests]
        top_p = [r.params.top_p for r in requests]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            logits = _top_k_top_p(logits, top_k, top_p)
        probs = logits.softmax(dim=-1)
        if any(r.params.min_p > 0 for r in requests):  # on the host: no read-back
            min_p = to_device([r.params.min_p for r in requests], dev, torch.float32)
            limit = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
            probs = probs.masked_fill(probs < limit, 0.0)
            probs = probs / probs.sum(dim=-1, keepdim=True)  # rejection sampling needs a distribution
        return probs

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
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


def _plain_greedy(requests: list[Request]) -> bool:
    """Rows whose token is the bare argmax: nothing to mask, penalise or report."""
    return all(
        r.params.greedy and r.grammar is None and not r.params.needs_penalties and r.params.logprobs is None
        and r.num_output_tokens >= r.params.min_tokens
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
