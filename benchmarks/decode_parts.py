"""Where a batch-1 decode step of the default model goes, on the CPU: the model's forward for one
decode row through the C++ decoder (tokenmill/model/cpu_decoder.py) and op by op, the LM head's
one row, each linear of a layer with its weights cold (all 30 layers' copies in turn, so they
come from memory) and the read bandwidth of this machine (the floor's denominator).

    PYTHONPATH=. python benchmarks/decode_parts.py [--context 20] [--repeats 200]

Medians of `repeats` calls in microseconds (cpu_kernels.py's timer and bandwidth probe); the
CPU model is printed first.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.cpu_kernels import bandwidth_gbs, us
from tests.model import real
from tests.model.test_cpu_decoder import BLOCK, run
from tokenmill.model.attention.kv_dtype import row_width
from tokenmill.model.layers import weight_nbytes
from tokenmill.plan.calibrate import machine_facts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=20, help="tokens already in the KV pool")
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    print(f"CPU: {machine_facts()['cpu']}, {torch.get_num_threads()} threads")
    m = real.model("auto", cpu_kernel=True)
    cfg = m.config
    ids = real.loaded("none").tokenizer.encode(real.text())[: args.context + 1]
    blocks = -(-len(ids) // BLOCK)
    kv = torch.zeros(2, cfg.num_layers, blocks, cfg.num_kv_heads, BLOCK, row_width(cfg.head_dim, torch.bfloat16),
                     dtype=torch.bfloat16)
    table = list(range(blocks))
    run(m, kv, [], [(0, ids[:-1], table)])
    step = lambda: run(m, kv, [(len(ids) - 1, [ids[-1]], table)], [])  # noqa: E731

    decoder = m.cpu_decoder
    print(f"forward, 1 decode row, C++ decoder: {us(step, args.repeats):.0f} us")
    m.cpu_decoder = None
    print(f"forward, 1 decode row, op by op:    {us(step, args.repeats):.0f} us")
    m.cpu_decoder = decoder
    h = torch.randn(1, cfg.hidden_size)
    head = weight_nbytes(m.lm_head)
    head_us = us(lambda: m.compute_logits(h), args.repeats)
    print(f"LM head, 1 row (hot): {head_us:.0f} us, {head / head_us / 1e3:.1f} GB/s of {head / 2**20:.1f} MiB")

    total = 0.0
    for name, get in [("q+k+v", lambda layer: layer.self_attn.qkv_proj), ("o", lambda layer: layer.self_attn.o_proj),
                      ("gate+up", lambda layer: layer.mlp.gate_up), ("down", lambda layer: layer.mlp.down)]:
        lins = [get(layer) for layer in m.layers]
        x = torch.randn(1, lins[0].in_features)
        nbytes = weight_nbytes(lins[0])

        def cold(lins=lins, x=x):
            for lin in lins:
                lin(x)

        lin_us = us(cold, max(10, args.repeats // 10)) / len(lins)
        total += lin_us
        shape = f"{lins[0].out_features}x{lins[0].in_features}"
        print(f"{name} {shape}, 1 row, cold: {lin_us:.1f} us, {nbytes / lin_us / 1e3:.1f} GB/s")
    print(f"the four linears x {cfg.num_layers} layers: {total * cfg.num_layers / 1000:.2f} ms")

    print(f"read bandwidth (cpu_kernels.py's probe): {bandwidth_gbs():.1f} GB/s")


if __name__ == "__main__":
    main()
