"""Where a many-row step of the default model goes on the CPU: the C++ attention kernel alone
for one layer (decode rows, and prompts prefilled as one chunk each), and the C++ decoder's
forward for the same rows (every layer: linears, attention, norms), plus the LM head.

    PYTHONPATH=. python benchmarks/decode_batch.py [--rows 16] [--context 260] [--prompts 4]
        [--prompt-len 200] [--repeats 30] [--threads N]

Medians in milliseconds; the pool is bfloat16 (the CPU default), filled with random rows. The
CPU model is printed first. To compare two commits, run this from a `git worktree` of each,
alternating: the box's speed drifts within minutes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tests.model import real
from tests.model.test_cpu_decoder import BLOCK, run
from tokenmill.model.attention import cpu_backend
from tokenmill.model.attention.kv_dtype import row_width, to_pool
from tokenmill.plan.calibrate import machine_facts


def median_ms(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    return statistics.median(samples)


def attention_ms(rows_ctx: list[tuple[int, int]], seqs: int, ctx: int, repeats: int) -> float:
    """One layer of the default model's shape (9 heads, 3 KV heads, 64): rows (sequence, context)."""
    kernel = cpu_backend.kernel()
    g = torch.Generator().manual_seed(0)
    per = -(-ctx // BLOCK)
    k = to_pool(torch.randn(seqs * per, 3, BLOCK, 64, generator=g), torch.bfloat16)
    v = to_pool(torch.randn(seqs * per, 3, BLOCK, 64, generator=g), torch.bfloat16)
    tables = torch.arange(seqs * per).view(seqs, per)
    rows, lens = (torch.tensor(x) for x in zip(*rows_ctx))
    q = torch.randn(len(rows_ctx), 9, 64, generator=g)
    out = torch.empty_like(q)
    return median_ms(lambda: kernel(q, k, v, tables, rows, lens, 0.125, out), repeats)


def step_inputs(cfg, rows: int, context: int, prompts: int, prompt_len: int):
    """A bfloat16 pool of random rows, `rows` decode rows at `context` tokens (one sequence each)
    and `prompts` prompts of `prompt_len` tokens, as tests.model.test_cpu_decoder's `run` takes
    them: (kv, decodes, prompts)."""
    per = -(-(max(context + 1, prompt_len)) // BLOCK)
    kv = torch.zeros(2, cfg.num_layers, per * max(rows, prompts), cfg.num_kv_heads, BLOCK,
                     row_width(cfg.head_dim, torch.bfloat16), dtype=torch.bfloat16).normal_()
    table = lambda i: list(range(i * per, (i + 1) * per))  # noqa: E731
    decodes = [(context, [100 + i], table(i)) for i in range(rows)]
    chunks = [(0, [100 + (i * 7 + j) % 5000 for j in range(prompt_len)], table(i)) for i in range(prompts)]
    return kv, decodes, chunks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16, help="decode rows, one sequence each")
    ap.add_argument("--context", type=int, default=260, help="tokens in each decode row's context")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU: {machine_facts()['cpu']}, {torch.get_num_threads()} threads")
    R, C, S, L = args.rows, args.context, args.prompts, args.prompt_len
    dec = attention_ms([(i, C) for i in range(R)], R, C, args.repeats)
    pre = attention_ms([(i // L, i % L + 1) for i in range(S * L)], S, L, args.repeats)
    print(f"attention, one layer: {R} decode rows x {C} keys {dec:.3f} ms; {S} x {L}-token prompts {pre:.3f} ms")

    m = real.model("auto", cpu_kernel=True)
    cfg = m.config
    kv, decodes, prompts = step_inputs(cfg, R, C, S, L)
    fwd = median_ms(lambda: run(m, kv, decodes, []), args.repeats)
    h = torch.randn(R, cfg.hidden_size)
    head = median_ms(lambda: m.compute_logits(h), args.repeats)
    prefill = median_ms(lambda: run(m, kv, [], prompts), max(3, args.repeats // 6))
    print(f"C++ decoder forward: {R} decode rows at {C} tokens {fwd:.2f} ms; LM head, {R} rows {head:.2f} ms; "
          f"{S} x {L}-token prompts {prefill:.1f} ms ({prefill / (S * L):.3f} ms per token)")


if __name__ == "__main__":
    main()
