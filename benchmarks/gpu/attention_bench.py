"""Paged attention on the GPU: the Triton kernels vs the torch path, and decode bandwidth.

Decode attention reads every K/V byte of the batch's contexts once, so its floor is
KV bytes / memory bandwidth. The bandwidth is measured in the same run as a large
device-to-device copy (bytes read + bytes written per second); the kernel's achieved
bandwidth is KV bytes read / kernel time. Every timed call reads a cold L2 (a 256 MiB buffer
is written between calls), as the pool would be in serving. Shapes: Llama-3-8B attention
(32 query heads, 8 KV heads, head_dim 128, bf16, 16-token blocks).

    python benchmarks/gpu/attention_bench.py [--json out.json] [--table out.txt]
    python benchmarks/gpu/attention_bench.py --smoke   # CPU, Triton's interpreter, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tokenmill.model.attention import AttentionMetadata, PrefillChunk, TorchAttention  # noqa: E402
from tokenmill.model.attention import triton_backend as ta  # noqa: E402

BLOCK = 16


class Timer:
    """Median seconds of fn() over reps, each from a cold L2 (GPU) or wall clock (smoke)."""

    def __init__(self, device: str, reps: int):
        self.device, self.reps = device, reps
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device=device) if device == "cuda" else None

    def __call__(self, fn) -> float:
        fn()  # compile / warm up
        times = []
        for _ in range(self.reps):
            if self.device != "cuda":
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
                continue
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int, timer: Timer) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timer(lambda: dst.copy_(src))  # read + write


def torch_path(q, k_cache, v_cache, meta, scale, timer) -> tuple[torch.Tensor, float]:
    """(output, seconds) of the torch backend, its per-step preparation done once as in the model."""
    backend = TorchAttention()
    step = backend.prepare(meta, k_cache)
    ref = backend.forward(q, k_cache, v_cache, step, scale)
    return ref, timer(lambda: backend.forward(q, k_cache, v_cache, step, scale))


def decode_case(batch, context, heads, kv_heads, dim, dtype, device, timer, copy_bw, tile=(64, 4, 2)):
    """tile: (block_n, num_warps, num_stages) of the decode kernel."""
    blocks = -(-context // BLOCK)
    pool = torch.randn(batch * blocks + 1, kv_heads, BLOCK, dim, dtype=dtype, device=device)
    k_cache, v_cache = pool, torch.randn_like(pool)
    # Each sequence gets its blocks in a random order, as a long-running pool would.
    tables = (torch.randperm(batch * blocks, device=device) + 1).view(batch, blocks)
    lens = torch.full((batch,), context, device=device)
    meta = AttentionMetadata(torch.zeros(batch, dtype=torch.long), batch, tables, lens, [])
    q = torch.randn(batch, heads, dim, dtype=dtype, device=device)
    scale = dim**-0.5
    out = torch.empty_like(q)
    block_n, warps, stages = tile
    opts = dict(block_n=block_n, num_warps=warps, num_stages=stages)
    t_triton = timer(lambda: ta.decode_attention(q, k_cache, v_cache, tables, lens, scale, out=out, **opts))
    ref, t_torch = torch_path(q, k_cache, v_cache, meta, scale, timer)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    kv_bytes = 2 * batch * context * kv_heads * dim * pool.element_size()
    return {
        "kind": "decode",
        "shape": f"B={batch} ctx={context}",
        "tile": "n%d w%d s%d" % tile,
        "splits": ta.decode_splits(q, tables, kv_heads, BLOCK, block_n=block_n)[1],
        "triton_us": t_triton * 1e6,
        "torch_us": t_torch * 1e6,
        "speedup": t_torch / t_triton,
        "GB/s": kv_bytes / t_triton / 1e9,
        "of_copy": kv_bytes / t_triton / copy_bw,
        "rel_err": err,
    }


def prefill_case(tokens, heads, kv_heads, dim, dtype, device, timer):
    """One whole prompt (context == tokens, plain causal): the torch path runs SDPA there."""
    blocks = -(-tokens // BLOCK)
    k_cache = torch.randn(blocks, kv_heads, BLOCK, dim, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(blocks, device=device)
    chunk = PrefillChunk(0, tokens, tokens, table)
    meta = AttentionMetadata(torch.zeros(tokens, dtype=torch.long), 0, None, None, [chunk])
    packed = ta.pack_prefills(meta.prefills, torch.device(device))
    q = torch.randn(tokens, heads, dim, dtype=dtype, device=device)
    out = torch.empty_like(q)
    scale = dim**-0.5
    t_triton = timer(lambda: ta.prefill_attention(q, k_cache, v_cache, packed, scale, out))
    ref, t_torch = torch_path(q, k_cache, v_cache, meta, scale, timer)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    flops = 2 * tokens * tokens * heads * dim  # QK^T and PV, causal half: 2 * (2 * n^2 / 2) * H * D
    return {
        "kind": "prefill",
        "shape": f"n={tokens}",
        "tile": "m64 n64 w4 s2",
        "splits": 1,
        "triton_us": t_triton * 1e6,
        "torch_us": t_torch * 1e6,
        "speedup": t_torch / t_triton,
        "TFLOP/s": flops / t_triton / 1e12,
        "rel_err": err,
    }


def table(rows, copy_bw: float, device_name: str) -> str:
    lines = [
        f"device: {device_name}; copy bandwidth (read+write): {copy_bw / 1e9:.0f} GB/s",
        "| kind | shape | tile | splits | triton us | torch us | speedup | GB/s (of copy) or TFLOP/s | rel err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rate = f"{r['GB/s']:.0f} ({r['of_copy']:.0%})" if r["kind"] == "decode" else f"{r['TFLOP/s']:.1f} TFLOP/s"
        lines.append(
            f"| {r['kind']} | {r['shape']} | {r['tile']} | {r['splits']} | {r['triton_us']:.1f} | {r['torch_us']:.1f} "
            f"| {r['speedup']:.2f}x | {rate} | {r['rel_err']:.1e} |"
        )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under Triton's interpreter")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--table", help="write the table here")
    args = ap.parse_args()
    if args.smoke:
        device, dtype, reps = "cpu", torch.float32, 1
        heads, kv_heads, dim = 4, 2, 64
        decodes, tuned, prefills, copy_bytes = [(2, 40)], [(2, 40)], [20], 1 << 20
        name = "cpu (Triton interpreter, smoke: the figures mean nothing)"
    else:
        device, dtype, reps = "cuda", torch.bfloat16, 20
        heads, kv_heads, dim = 32, 8, 128
        # KV read per call: 16 MiB (fits in L2 only without the flush), 128 MiB ... 1 GiB.
        decodes = [(1, 4096), (1, 32768), (16, 4096), (64, 2048), (256, 1024), (256, 2048)]
        tuned, prefills, copy_bytes = [(1, 32768), (64, 2048)], [512, 4096], 1 << 30
        name = torch.cuda.get_device_name()
    timer = Timer(device, reps)
    copy_bw = copy_bandwidth(device, copy_bytes, timer)
    print(f"copy bandwidth: {copy_bw / 1e9:.0f} GB/s", flush=True)
    cases = [(decode_case, (b, ctx, heads, kv_heads, dim, dtype, device, timer, copy_bw)) for b, ctx in decodes]
    # A few other tiles of the decode kernel on two shapes: tuning data from the same GPU slot.
    for b, ctx in tuned:
        for tile in [(32, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 3)]:
            cases.append((decode_case, (b, ctx, heads, kv_heads, dim, dtype, device, timer, copy_bw, tile)))
    cases += [(prefill_case, (n, heads, kv_heads, dim, dtype, device, timer)) for n in prefills]
    rows, failed = [], 0
    for fn, case_args in cases:
        try:  # one failing case (a tile that does not fit, out of memory) must not cost the table
            rows.append(fn(*case_args))
            print(rows[-1], flush=True)
        except Exception as e:  # noqa: BLE001
            failed += 1
            print(f"FAILED {fn.__name__}{case_args[:2]}: {type(e).__name__}: {e}", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    text = table(rows, copy_bw, name)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "copy_GBps": copy_bw / 1e9, "rows": rows}, indent=1))
    if args.table:
        Path(args.table).write_text(text + "\n")
    print(text)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
