"""What the simulated clients send and when: open-loop arrivals (Poisson or gamma, vLLM's
convention via tokenmill.bench.arrivals), the arrivals of a `tokenmill bench` result JSON, or
a closed loop of users with think time (see Clients in simulator.py)."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from tokenmill.bench.arrivals import arrival_offsets


@dataclass(frozen=True)
class TraceRequest:
    arrival: float  # seconds from the start; a closed loop sends it later if no user is free
    input_len: int
    output_len: int
    prefix_len: int = 0  # leading prompt tokens shared by every request with the same prefix_group
    prefix_group: int = 0


def _length(rng: random.Random, target: int, ratio: float) -> int:
    # bench.datasets._sample_len's rule, so a simulated workload matches a benched one.
    low = max(1, int(target * (1.0 - ratio)))
    return rng.randint(low, max(low, int(target * (1.0 + ratio))))


def synthetic(num_requests: int, rate: float = math.inf, input_len: int = 1024, output_len: int = 128,
              range_ratio: float = 0.0, prefix_len: int = 0, burstiness: float = 1.0, seed: int = 0,
              num_prefixes: int = 1) -> list[TraceRequest]:
    """`bench --dataset-name random` in shape: input_len counts the shared prefix too."""
    rng = random.Random(seed)
    offsets = arrival_offsets(num_requests, rate, burstiness, seed)
    out = []
    for i, t in enumerate(offsets):
        n_in = _length(rng, input_len, range_ratio)
        out.append(TraceRequest(t, prefix_len + n_in, _length(rng, output_len, range_ratio), prefix_len,
                                i % num_prefixes))
    return out


def from_bench_result(path: str | Path, prefix_len: int = 0) -> list[TraceRequest]:
    """The arrivals, prompt and output lengths of a `tokenmill bench --result-json` file (its
    start_times are offsets from the first request). A bench run with --random-prefix-len
    should pass the same prefix_len: the file keeps lengths, not prompts."""
    try:
        result = json.loads(Path(path).read_text())
        result["input_lens"], result["output_lens"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a readable tokenmill bench result JSON ({e})") from None
    starts = result.get("start_times") or [0.0] * len(result["input_lens"])
    expected = result.get("output_lens")
    return [
        TraceRequest(float(t), int(n_in), int(n_out), prefix_len)
        for t, n_in, n_out in zip(starts, result["input_lens"], expected)
        if n_out > 0  # a failed request has no length to replay
    ]


def prompt_ids(index: int, request: TraceRequest, vocab_size: int) -> list[int]:
    """Token ids cheap to build for millions of requests: the shared prefix is the same for its
    group, the rest is unique to the request (its first two ids spell its index), so prefix-cache
    hits happen exactly where the workload shares tokens."""
    prefix = [(request.prefix_group * 7919 + j * 31 + 1) % vocab_size for j in range(request.prefix_len)]
    n = request.input_len - request.prefix_len
    hi, lo = divmod(index, vocab_size)
    body = ([hi % vocab_size, lo] + [lo] * (n - 2))[:n] if n > 0 else []
    return prefix + body


def thin(trace: list[TraceRequest], share: float, seed: int = 0) -> list[TraceRequest]:
    """Each request kept with probability `share` (seeded): the traffic a sample of a fleet's
    replicas would get under a balancing router. Thinning keeps Poisson arrivals Poisson (at
    share x the rate) and keeps the length distribution; it is an approximation of a fleet,
    not a simulation of it (see `plan simulate --sample-replicas`)."""
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    rng = random.Random(seed ^ 0x5A3D1E)
    return [t for t in trace if rng.random() < share]
