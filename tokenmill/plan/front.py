"""The front's latency outside the engine's steps, from a client's results lined up with the
server's step log (`tokenmill bench --result-json` keeps `start_unix`, the first send's wall
clock; a step log line keeps its step's wall-clock start).

Only requests sent alone to an idle engine are read: no step in progress, no other send within
50 ms, and the first step after the send took a request in. For those, ingress is the send to
that step's start (HTTP, validation, tokenizing, the hand-over to the engine thread), and, where
that step ended the prompt (so gave the first token), egress is its end to the client's first
token. Elsewhere the two hide inside waits the simulator prices itself (a step in
progress, other requests' prefills). Medians: a neighbour on a shared machine makes a few
requests slow, and the simulator adds each as a constant.
"""

from __future__ import annotations

import bisect
import json
import statistics
from dataclasses import dataclass

from tokenmill.bench.report import records_from_result
from tokenmill.engine.step_log import read_step_log

ALONE_S = 0.05  # no other send this close before or after


@dataclass
class FrontLatency:
    ingress_s: float
    egress_s: float
    requests: int  # requests sent alone to an idle engine (ingress's median is over these)


def front_latency(step_logs: list[str], results: list[str]) -> FrontLatency | None:
    """None where fewer than 5 requests were sent alone to an idle engine."""
    steps = sorted((line for path in step_logs for line in read_step_log(path) if line["seqs"]), key=lambda x: x["t"])
    starts = [s["t"] for s in steps]
    sends = []  # (wall-clock send, ttft)
    for path in results:
        try:
            with open(path) as f:
                r = json.load(f)
            records = records_from_result(r)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            raise ValueError(f"--bench-result {path}: not a readable tokenmill bench result ({e!r})") from None
        if "start_unix" not in r:
            raise ValueError(f"--bench-result {path}: no start_unix (written by an older tokenmill bench)")
        sends += [(r["start_unix"] + rec.start_time, rec.ttft) for rec in records if rec.success and rec.ttft > 0]
    sends.sort()
    ingress, egress = [], []
    for i, (t, ttft) in enumerate(sends):
        if (i and t - sends[i - 1][0] < ALONE_S) or (i + 1 < len(sends) and sends[i + 1][0] - t < ALONE_S):
            continue
        k = bisect.bisect_left(starts, t)  # the first step to start after the send
        if k == len(steps) or (k and steps[k - 1]["t"] + steps[k - 1]["s"] > t) or not steps[k].get("new"):
            continue  # a step was in progress, or the next one took nobody in
        step = steps[k]
        ingress.append(step["t"] - t)
        # Its first token came from this step if the step ended a prompt (alone on an idle
        # engine, the prompt is this request's).
        if any(samples and prompt for _, _, samples, prompt in step["seqs"]):
            egress.append(ttft - (step["t"] + step["s"] - t))
    if len(ingress) < 5:
        return None
    return FrontLatency(statistics.median(ingress), statistics.median(egress) if len(egress) >= 5 else 0.0,
                        len(ingress))
