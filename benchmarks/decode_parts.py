"""Where a batch-1 decode step of the default model goes, on the CPU: the model's forward for one
decode row through the C++ decoder (tokenmill/model/cpu_decoder.py) and op by op, the LM head's
one row, each linear of a layer with its weights cold (all 30 layers' copies in turn, so they
come from memory) and the read bandwidth of this machine (the floor's denominator).

    PYTHONPATH=. python benchmarks/decode_parts.py [--context 20] [--repeats 200]

Medians of `repeats` calls in microseconds; the CPU model is printed first.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from tests.model import real
from tests.model.test_cpu_decoder import BLOCK, run
from tokenmill.model.attention.kv_dtype import row_width


def median_us(f, repeats: int) -> float:
    for _ in range(3):
        f()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e6


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=20, help="tokens already in the KV pool")
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads")
    m = real.model("auto", cpu_kernel=True)
    cfg = m.config
    ids = real.loaded("none").tokenizer.encode(real.text())[: args.context + 1]
    blocks = -(-len(ids) // BLOCK)
    kv = torch.zeros(2, cfg.num_layers, blocks, cfg.num_kv_heads, BLOCK, row_width(cfg.head_dim, torch.bfloat16),
                     dtype=torch.bfloat16)
    table = list(range(blocks))
    run(m, kv, [], [(0, ids[:-1], 0, table)])
    step = lambda: run(m, kv, [(len(ids) - 1, [ids[-1]], 0, table)], [])  # noqa: E731

    decoder = m.cpu_decoder
    print(f"forward, 1 decode row, C++ decoder: {median_us(step, args.repeats):.0f} us")
    m.cpu_decoder = None
    print(f"forward, 1 decode row, op by op:    {median_us(step, args.repeats):.0f} us")
    m.cpu_decoder = decoder
    h = torch.randn(1, cfg.hidden_size)
    head = sum(b.numel() * b.element_size() for b in m.lm_head.buffers())
    us = median_us(lambda: m.compute_logits(h), args.repeats)
    print(f"LM head, 1 row (hot): {us:.0f} us, {head / us / 1e3:.1f} GB/s of {head / 2**20:.1f} MiB")

    total = 0.0
    for name, get in [("q+k+v", lambda layer: layer.self_attn.qkv_proj), ("o", lambda layer: layer.self_attn.o_proj),
                      ("gate+up", lambda layer: layer.mlp.gate_up), ("down", lambda layer: layer.mlp.down)]:
        lins = [get(layer) for layer in m.layers]
        x = torch.randn(1, lins[0].in_features)
        nbytes = sum(b.numel() * b.element_size() for b in lins[0].buffers())

        def cold(lins=lins, x=x):
            for lin in lins:
                lin(x)

        us = median_us(cold, max(10, args.repeats // 10)) / len(lins)
        total += us
        print(f"{name} {lins[0].out_features}x{lins[0].in_features}, 1 row, cold: {us:.1f} us, {nbytes / us / 1e3:.1f} GB/s")
    print(f"the four linears x {cfg.num_layers} layers: {total * cfg.num_layers / 1000:.2f} ms")

    x = torch.ones(256 * 2**20 // 4)
    us = median_us(lambda: x.sum(), 10)
    print(f"read bandwidth (sum of 256 MiB): {x.numel() * 4 / us / 1e3:.1f} GB/s")


if __name__ == "__main__":
    main()
