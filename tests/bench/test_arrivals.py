from __future__ import annotations

import math

import numpy as np
import pytest

from tokenmill.bench.arrivals import arrival_offsets


def gaps(offsets):
    return np.diff([0.0, *offsets])


def test_infinite_rate_sends_everything_at_once():
    assert arrival_offsets(5, math.inf) == [0.0] * 5


def test_poisson_gaps_have_the_asked_mean_and_are_exponential():
    g = gaps(arrival_offsets(4000, rate=8.0, burstiness=1.0, seed=1))
    assert g.mean() == pytest.approx(1 / 8.0, rel=1e-9)  # rescaled: exactly n/rate overall
    assert g.std() / g.mean() == pytest.approx(1.0, abs=0.06)  # exponential: CV = 1
    assert (g >= 0).all()


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_sets_the_spread(burstiness):
    g = gaps(arrival_offsets(4000, rate=2.0, burstiness=burstiness, seed=2))
    assert g.mean() == pytest.approx(0.5, rel=1e-9)
    assert g.std() / g.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.1)


def test_infinite_burstiness_is_a_metronome_and_seed_is_reproducible():
    assert gaps(arrival_offsets(4, 2.0, math.inf)) == pytest.approx([0.5] * 4)
    assert arrival_offsets(50, 3.0, seed=7) == arrival_offsets(50, 3.0, seed=7)
    assert arrival_offsets(50, 3.0, seed=7) != arrival_offsets(50, 3.0, seed=8)


def test_bad_rates_are_rejected():
    with pytest.raises(ValueError):
        arrival_offsets(3, 0.0)
    with pytest.raises(ValueError):
        arrival_offsets(3, 1.0, burstiness=0.0)
