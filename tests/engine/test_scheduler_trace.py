"""The scheduler and KV cache manager driven alone, as the capacity simulator will drive them:
a seeded synthetic trace (arrivals over steps, shared prefixes), fake token ids instead of a
model, several hundred steps, and no torch anywhere in the process.

The trace runs in a fresh interpreter (this file run as a module) because the test process
has long since imported torch for other tests; only the child can show the scheduler's
imports stay torch-free.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# Only torch-free modules here: the child process imports this file.
from tests.engine.helpers import make_request
from tokenmill.config import EngineConfig
from tokenmill.engine.request import RequestStatus
from tokenmill.engine.scheduler import Scheduler

REPO = Path(__file__).resolve().parents[2]

# A pool of 64 blocks of 16 tokens holds about four of the longest requests (300 tokens) at
# once, so 16 sequences in flight must preempt.
SETTINGS = dict(model="trace", block_size=16, num_kv_blocks=64, max_num_seqs=16, max_num_batched_tokens=256)
MAX_MODEL_LEN = 512
NUM_REQUESTS = 120
VOCAB = 1000


@dataclass
class TraceRequest:
    arrival_step: int
    prompt: list[int]
    output_len: int


def synthetic_trace(seed: int) -> list[TraceRequest]:
    rng = random.Random(seed)
    # Half the requests open with one of a few "system prompts", so the prefix cache is hit.
    systems = [[rng.randrange(VOCAB) for _ in range(rng.randint(16, 80))] for _ in range(4)]
    trace, step = [], 0
    for _ in range(NUM_REQUESTS):
        step += rng.choice((0, 0, 1, 2, 3))  # bursts and gaps
        prefix = rng.choice(systems) if rng.random() < 0.5 else []
        prompt = prefix + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 120))]
        trace.append(TraceRequest(step, prompt, rng.randint(1, 100)))
    return trace


def fake_token(index: int, position: int) -> int:
    # A function of the request and the output position: a token lost or repeated across a
    # preemption shows up as a wrong sequence, not just a wrong count.
    return (index * 31 + position * 17) % VOCAB


def run_trace(seed: int, enable_prefix_caching: bool) -> dict:
    config = EngineConfig.from_flat(**SETTINGS, enable_prefix_caching=enable_prefix_caching)
    sched = Scheduler.from_config(config, config.cache.num_kv_blocks, MAX_MODEL_LEN)
    kv = sched.kv
    trace = synthetic_trace(seed)
    requests = []
    step = 0
    while len(requests) < len(trace) or sched.has_unfinished:
        while len(requests) < len(trace) and trace[len(requests)].arrival_step <= step:
            t = trace[len(requests)]
            r = make_request(f"r{len(requests)}", t.prompt, max_tokens=t.output_len, arrival_order=len(requests))
            sched.add_request(r)
            requests.append(r)
        out = sched.schedule()
        assert not (out.is_empty and sched.has_unfinished), f"stalled at step {step}"
        sampled = {
            c.request.request_id: [fake_token(c.request.arrival_order, c.request.num_output_tokens)]
            for c in out.chunks
            if c.samples
        }
        sched.update(out, sampled)
        kv.check_invariants()
        assert sum(len(r.block_ids) for r in sched.running) == sum(kv.ref_count(b) for b in range(kv.num_blocks))
        step += 1
        assert step < 10_000, "trace never drained"

    for i, (r, t) in enumerate(zip(requests, trace)):
        assert r.status is RequestStatus.FINISHED_LENGTH, (r.request_id, r.status)
        assert r.output_token_ids == [fake_token(i, p) for p in range(t.output_len)], r.request_id
        assert not r.block_ids
    assert kv.num_free_blocks == kv.num_blocks
    return {
        "steps": step,
        "finished": len(requests),
        "preemptions": sched.num_preemptions,
        "prefix_hits": kv.prefix_hits,
    }


def main() -> None:
    results = {str(caching): run_trace(seed=0, enable_prefix_caching=caching) for caching in (False, True)}
    print(json.dumps({
        "results": results,
        "torch_imported": "torch" in sys.modules,
        "tokenmill_from": sys.modules["tokenmill"].__file__,
    }))


def test_scheduler_steps_a_trace_without_torch():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.engine.test_scheduler_trace"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert Path(report["tokenmill_from"]).is_relative_to(REPO)
    for caching, r in report["results"].items():
        assert r["finished"] == NUM_REQUESTS, caching
        assert r["steps"] >= 300, caching  # long enough to cycle the pool many times over
        assert r["preemptions"] > 0, caching
    assert report["results"]["True"]["prefix_hits"] > 0
    assert report["results"]["False"]["prefix_hits"] == 0
    assert not report["torch_imported"]


if __name__ == "__main__":
    main()
