"""Verification of draft tokens against the target model's distributions.

Greedy keeps the longest prefix of drafts equal to the target's argmax. Sampling uses
rejection sampling (Leviathan et al. 2023; Chen et al. 2023): draft j is kept with
probability min(1, p_j(d) / q_j(d)); at the first rejection a replacement is drawn from the
normalised max(0, p_j - q_j); if every draft is kept, one bonus token is drawn from p_k. The
tokens that come out are distributed exactly as if the target sampled them one by one.
q is the proposer's distribution; a deterministic proposer (prompt lookup, greedy draft
model) has q = one-hot at its draft, so a draft is kept with probability p_j(d).
"""

from __future__ import annotations

import torch


def verify_greedy(target_argmax: list[int], drafts: list[int]) -> list[int]:
    """Accepted drafts, then the target's own token at the first mismatch (or the bonus)."""
    n = 0
    while n < len(drafts) and drafts[n] == target_argmax[n]:
        n += 1
    return target_argmax[: n + 1]


def accept_mask(uniforms: torch.Tensor, p_draft: torch.Tensor, q_draft: torch.Tensor) -> torch.Tensor:
    """u < p/q, written without the division (q > 0 for any token the proposer drew)."""
    return uniforms * q_draft < p_draft


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Where to draw the replacement after a rejection: the mass p has beyond q."""
    r = (p - q).clamp_(min=0.0)
    total = r.sum()
    # p == q leaves nothing (and then a rejection has probability 0); fall back to p.
    return r / total if total > 0 else p


def verify_sampled(
    probs: torch.Tensor,  # [k + 1, vocab] target distributions after temperature/top-k/top-p
    drafts: list[int],
    draft_probs: torch.Tensor | None,  # [k, vocab], or None for a deterministic proposer
    generator: torch.Generator | None,
) -> list[int]:
    k = len(drafts)
    dev = probs.device
    d = torch.tensor(drafts, dtype=torch.long, device=dev)
    rows = torch.arange(k, device=dev)
    if draft_probs is None:
        draft_probs = torch.zeros(k, probs.shape[1], dtype=probs.dtype, device=dev)
        draft_probs[rows, d] = 1.0
    # Always k uniforms, so a seeded request consumes its generator the same way each step.
    uniforms = torch.rand(k, generator=generator, dtype=probs.dtype, device=dev)
    accepted = accept_mask(uniforms, probs[rows, d], draft_probs[rows, d])
    rejected = (~accepted).nonzero()
    n = int(rejected[0]) if len(rejected) else k
    last = residual_distribution(probs[n], draft_probs[n]) if n < k else probs[k]
    token = int(torch.multinomial(last, 1, generator=generator))
    return drafts[:n] + [token]
