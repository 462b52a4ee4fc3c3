"""When each request is sent: offsets in seconds from the start of the measured phase.

Gaps are gamma-distributed with shape = burstiness and mean 1/rate, so burstiness 1 is a
Poisson process, below 1 burstier, above 1 more regular (vLLM's convention). As in vLLM the
offsets are rescaled so the last one lands at n/rate exactly: the sum of random gaps drifts by
a few percent otherwise, and throughput figures would depend on the seed.
"""

from __future__ import annotations

import math

import numpy as np


def arrival_offsets(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    if n <= 0:
        return []
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * n
    if math.isinf(burstiness):
        gaps = np.full(n, 1.0 / rate)
    else:
        rng = np.random.default_rng(seed)
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    offsets = np.cumsum(gaps)
    if offsets[-1] > 0:
        offsets *= (n / rate) / offsets[-1]
    return [float(x) for x in offsets]
