"""The default model's CPU steps with its quantized weights in the huge-page arena
(tokenmill/model/weight_arena.py) and without it, in one process, calls alternating A B B A ...
so the box's drift hits both alike:

    PYTHONPATH=. python benchmarks/weight_arena_ab.py [--repeats 200] [--rows 1,16]

Per row count: the forward of that many decode rows (one sequence each, 260 tokens of context,
blocks scattered over the pool) through the C++ decoder plus the LM head over them, as a decode
step computes it. Medians in milliseconds, and how many bytes of each model's weights sit on huge
pages (/proc/self/smaps).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from tests.model import real
from tests.model.test_cpu_decoder import BLOCK, run
from tokenmill.model import weight_arena
from tokenmill.model.attention import choose_backend
from tokenmill.model.attention.kv_dtype import row_width
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.quant import make_linear
from tokenmill.plan.calibrate import machine_facts


def build(arena: bool) -> LlamaForCausalLM:
    lm = real.loaded("auto")
    gather = weight_arena.gather
    if not arena:
        weight_arena.gather = lambda model: None
    try:
        factory = lambda weight, bias: make_linear(weight, bias, torch.float32, "auto", 32)  # noqa: E731
        return LlamaForCausalLM(lm.config, lm.weights, torch.float32, factory, max_positions=2048,
                                attention=choose_backend(torch.device("cpu"), torch.float32))
    finally:
        weight_arena.gather = gather


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--rows", default="1,16")
    args = ap.parse_args()
    print(f"CPU: {machine_facts()['cpu']}, {torch.get_num_threads()} threads")
    models = {"arena": build(True), "plain": build(False)}
    for name, m in models.items():
        huge = weight_arena.huge_page_bytes(m.lm_head.qweight)
        print(f"{name}: {'?' if huge is None else huge / 2**20:.0f} MiB of the mapping holding the LM head on huge pages")
    cfg = models["arena"].config
    context, blocks = 260, 1200
    kv = torch.zeros(2, cfg.num_layers, blocks, cfg.num_kv_heads, BLOCK, row_width(cfg.head_dim, torch.bfloat16),
                     dtype=torch.bfloat16).normal_()
    rng = random.Random(0)
    order = list(range(blocks))
    rng.shuffle(order)
    per = -(-(context + 1) // BLOCK)
    ids = real.loaded("auto").tokenizer.encode(real.text())
    for rows in (int(r) for r in args.rows.split(",")):
        decodes = [(context, [ids[r]], order[r * per:(r + 1) * per]) for r in range(rows)]
        times = {name: [] for name in models}
        for i in range(args.repeats + 4):
            for name in (list(models) if i % 2 else list(models)[::-1]):
                m = models[name]
                t = time.perf_counter()
                m.compute_logits(run(m, kv, decodes, []))
                times[name].append(time.perf_counter() - t)
        a, b = (statistics.median(times[n][4:]) * 1e3 for n in ("plain", "arena"))
        print(f"{rows} decode rows, forward + LM head: plain {a:.2f} ms, arena {b:.2f} ms, plain/arena {a / b:.2f}x")


if __name__ == "__main__":
    main()
