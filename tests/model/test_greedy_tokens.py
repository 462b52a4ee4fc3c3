"""The sampler's greedy readout on the CPU (qkernels.greedy_tokens): torch.argmax's indices,
ties, NaNs, infinities and signed zeros included."""

from __future__ import annotations

import pytest
import torch

from tokenmill.model import qkernels
from tokenmill.model.sampler import greedy_tokens

pytestmark = pytest.mark.skipif(qkernels.kernel() is None, reason="the C++ kernels could not be built here")


@pytest.mark.parametrize("vocab", [1, 7, 8, 31, 32, 33, 100, 49152])
def test_random_rows_give_torchs_argmax(vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(16, vocab, generator=g)
    assert torch.equal(qkernels.kernel().greedy_tokens(logits), logits.argmax(-1))


def test_ties_nans_infinities_and_zeros_follow_torch():
    rows = torch.randn(8, 77)
    rows[0, 3] = rows[0, 40] = 50.0                       # a tie: the first one
    rows[1, 60] = float("nan"); rows[1, 9] = float("nan")  # NaNs beat everything, the first NaN wins
    rows[1, 2] = float("inf")
    rows[2, :] = float("-inf")                            # every value -inf: index 0
    rows[3, :] = 0.0; rows[3, 5] = -0.0                   # zeros: the first, whatever its sign
    rows[4, :] = -0.0; rows[4, 70] = 0.0
    rows[5, 76] = float("inf")                            # in the tail past the vector width
    rows[6, 75] = float("nan")                            # a NaN in the tail only
    rows[7, :] = torch.finfo(torch.float32).min
    expected = rows.argmax(-1)
    assert torch.equal(qkernels.kernel().greedy_tokens(rows), expected)
    assert expected.tolist()[:3] == [3, 9, 0]


def test_the_sampler_helper_reads_any_layout_and_falls_back_where_it_must():
    logits = torch.randn(40, 6).t()  # not contiguous
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1))
    half = torch.randn(3, 50).half()  # not float32: torch's argmax
    assert torch.equal(greedy_tokens(half), half.argmax(-1))
    assert greedy_tokens(torch.randn(0, 10)).shape == (0,)


def test_bad_input_is_refused():
    with pytest.raises(RuntimeError, match="contiguous float32"):
        qkernels.kernel().greedy_tokens(torch.randn(4))
    with pytest.raises(RuntimeError, match="contiguous float32"):
        qkernels.kernel().greedy_tokens(torch.randn(2, 0))
