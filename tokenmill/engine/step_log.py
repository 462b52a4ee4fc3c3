"""`--step-log FILE`: one JSON line per engine step, what it computed and how long it took.

The planner fits its cost model on these lines (`tokenmill plan calibrate --step-log FILE`).
Steps timed inside a running server carry what an offline calibration cannot see: the HTTP
front, the streams and the client sharing the cores and the GIL with the engine (on a 2-core
CPU they made each step 15-30% slower than the same step offline). A production server's own
log calibrates the planner on its real traffic.

A line: {"t": unix seconds at the step's start, "s": the step's seconds (scheduling, the
forward pass, sampling, output processing), "seqs": [[start, tokens, samples, prompt], ...]}:
per sequence, its first position, the tokens it computed (drafts included), whether its
logits gave a token (0/1), whether the chunk started inside the prompt (0/1); "new": the
requests taken in since the previous line (between the two steps: the engine thread adds them
there). The front's work for those requests (HTTP, tokenizing) ran during the previous step,
on the same cores, and made it longer: calibrate fits that cost per arrival from this count.
"""

from __future__ import annotations

import json

from tokenmill.step import StepRecord


class StepLog:
    def __init__(self, path: str):
        # Line-buffered: a reader tailing the file, or a crash, sees whole lines only.
        self._file = open(path, "a", buffering=1)

    def write(self, started: float, seconds: float, record: StepRecord, new: int = 0) -> None:
        seqs = [[s.start, len(s.token_ids), int(s.sample is not None), int(s.prompt)] for s in record.seqs]
        self._file.write(json.dumps({"t": round(started, 6), "s": round(seconds, 6), "seqs": seqs, "new": new},
                                    separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._file.close()


def read_step_log(path: str) -> list[dict]:
    """The lines of a step log; a torn last line (the server was killed mid-write) is skipped."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
