"""The acceptance rule and the prompt-lookup search, alone."""

import pytest
import torch

from tests.stats import chi_square_p_value
from tokenmill.model import rejection
from tokenmill.spec.ngram import find_continuation
from tokenmill.model.rejection import verify_greedy, verify_sampled


def test_verify_greedy_keeps_matching_prefix_then_the_targets_token():
    assert verify_greedy([5, 6, 7, 8], [5, 6, 9]) == [5, 6, 7]
    assert verify_greedy([5, 6, 7, 8], [5, 6, 7]) == [5, 6, 7, 8]  # all kept + bonus
    assert verify_greedy([4, 6], [5]) == [4]


def _draws(p, q, n, seed):
    g = torch.Generator().manual_seed(seed)
    vocab = p.shape[1]
    counts = torch.zeros(vocab * vocab)
    qg = torch.Generator().manual_seed(seed + 1)
    for _ in range(n):
        # Decode until two tokens are out, as the engine would: each step drafts for the
        # remaining positions (from q, as a sampling draft model would) and verifies them.
        # Row j of p and q is position j's distribution, whatever came before.
        out: list[int] = []
        while len(out) < 2:
            pos = len(out)
            drafts = [int(torch.multinomial(q[j], 1, generator=qg)) for j in range(pos, q.shape[0])]
            out += verify_sampled(p[pos:], drafts, q[pos:], g)
        counts[out[0] * vocab + out[1]] += 1
    return counts


def _reference(p, n, seed):
    g = torch.Generator().manual_seed(seed)
    vocab = p.shape[1]
    # Position 1's distribution does not depend on token 0 here (fixed rows), so the
    # target's own joint is p0 x p1.
    a = torch.multinomial(p[0], n, replacement=True, generator=g)
    b = torch.multinomial(p[1], n, replacement=True, generator=g)
    return torch.bincount(a * vocab + b, minlength=vocab * vocab).float()


@pytest.fixture
def dists():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(3, 5) * 1.5, -1)  # target: k = 2 drafts + the bonus row
    q = torch.softmax(torch.randn(2, 5) * 1.5, -1)  # a different draft distribution
    return p, q


def test_rejection_sampling_reproduces_the_target_distribution(dists):
    p, q = dists
    n = 6000
    assert chi_square_p_value(_draws(p, q, n, 1), _reference(p, n, 2)) > 1e-3


def test_a_wrong_residual_is_caught(dists, monkeypatch):
    """Resampling from p instead of max(0, p - q) after a rejection is the classic bug."""
    p, q = dists
    monkeypatch.setattr(rejection, "residual_distribution", lambda p_row, q_row: p_row)
    n = 6000
    assert chi_square_p_value(_draws(p, q, n, 1), _reference(p, n, 2)) < 1e-3


def test_one_hot_draft_accepted_with_target_probability():
    p = torch.tensor([[0.25, 0.75, 0.0], [0.2, 0.3, 0.5]])
    g = torch.Generator().manual_seed(0)
    kept = sum(len(verify_sampled(p, [1], None, g)) == 2 for _ in range(4000))
    assert abs(kept / 4000 - 0.75) < 0.03
    # A rejected one-hot draft is never the replacement (its residual mass is 0), so the
    # first token is 0 only when accepted (p = 0.25) and never 2 (p = 0).
    g = torch.Generator().manual_seed(1)
    firsts = [verify_sampled(p, [0], None, g)[0] for _ in range(2000)]
    assert firsts.count(2) == 0 and 0.2 < firsts.count(0) / 2000 < 0.3


@pytest.mark.parametrize(
    "tokens, expected",
    [
        ([1, 2, 3, 4, 9, 1, 2, 3], [4, 9, 1]),  # 3-gram [1,2,3] seen before
        ([1, 2, 3, 7, 2, 3, 5, 2, 3], [5, 2, 3]),  # latest earlier occurrence of [2,3] wins
        ([1, 2, 3, 4], []),  # nothing repeats
        ([5, 5], []),  # a 1-gram is below min_n
        ([8, 5, 6, 0, 5, 6], [0, 5, 6]),
    ],
)
def test_prompt_lookup(tokens, expected):
    assert find_continuation(tokens, 2, 4, 3) == expected


def test_prompt_lookup_prefers_longer_ngrams():
    # [3] alone last occurred before 9, but the 2-gram [2, 3] points at 4.
    tokens = [2, 3, 4, 3, 9, 2, 3]
    assert find_continuation(tokens, 1, 3, 1) == [4]
    assert find_continuation(tokens, 1, 1, 1) == [9]
