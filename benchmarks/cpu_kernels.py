"""The CPU kernel choices, measured: (1) quantized linears vs a bf16 GEMM over their dequantized
weights by row count (why prompt rows and the LM head run dense copies), (2) the C++ attention
kernel vs the torch path for decodes by batch and context, and for one prefill chunk by length
(the torch path's SDPA), (3) the engine with and without the C++ kernel on the default model
(greedy, ignore_eos, engines interleaved, median of 3).

    python benchmarks/cpu_kernels.py [--threads 2] [--skip-engine]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from tokenmill.model.attention import AttentionMetadata, PrefillChunk, TorchAttention, cpu_backend
from tokenmill.model.quant import Int4Linear, Int8Linear


def us(fn, n: int = 30) -> float:
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


@torch.inference_mode()
def linears() -> None:
    print("| linear (out x in) | rows | quantized kernel us | bf16 dense us |\n|---|---|---|---|")
    shapes = {"int4 gate|up 3072x576": (3072, 576), "int4 down 576x1536": (576, 1536), "int4 q|k|v 960x576": (960, 576)}
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k)
        lin = Int4Linear.from_float(w, None, 32, torch.float32)
        dense = Int4Linear.from_float(w, None, 32, torch.float32, dense_rows="all")
        for m in (1, 4, 16, 64, 512):
            x = torch.randn(m, k)
            print(f"| {name} | {m} | {us(lambda: lin(x)):.0f} | {us(lambda: dense(x)):.0f} |")
    # The SmolLM2 LM head: Q8_0, one scale per 32 inputs (so one int8 kernel call per group).
    n, k = 49152, 576
    q = torch.randint(-127, 128, (n, k)).float()
    scales = torch.rand(k // 32, n) * 0.01
    head = Int8Linear(q, scales, 32, None, torch.float32)
    dense_head = Int8Linear(q, scales, 32, None, torch.float32, dense_rows="all")
    for m in (1, 4, 16, 64):
        x = torch.randn(m, k)
        print(f"| int8 LM head {n}x{k} | {m} | {us(lambda: head(x), 10):.0f} | {us(lambda: dense_head(x), 10):.0f} |")


@torch.inference_mode()
def attention() -> None:
    kernel = cpu_backend.kernel()
    if kernel is None:
        print("C++ kernel unavailable")
        return
    heads, kv_heads, dim, block, pool = 9, 3, 64, 16, 2000  # SmolLM2's attention
    g = torch.Generator().manual_seed(0)
    k_cache = torch.randn(pool, kv_heads, block, dim, generator=g)
    v_cache = torch.randn(pool, kv_heads, block, dim, generator=g)
    print("\n| decodes | context | torch path us | C++ kernel us | speedup |\n|---|---|---|---|---|")
    for b in (1, 4, 16, 64):
        for ctx in (40, 300):
            nb = -(-ctx // block)
            tables = torch.stack([torch.randperm(pool, generator=g)[:nb] for _ in range(b)])
            lens = torch.full((b,), ctx)
            meta = AttentionMetadata(torch.zeros(b, dtype=torch.long), b, tables, lens, [])
            torch_path = TorchAttention()
            step = torch_path.prepare(meta, k_cache)  # once per step in the engine, not per layer
            q = torch.randn(b, heads, dim, generator=g)
            out = torch.empty_like(q)
            t_ref = us(lambda: torch_path.forward(q, k_cache, v_cache, step, 0.125), 100)
            t_k = us(lambda: kernel(q, k_cache, v_cache, tables, torch.arange(b), lens, 0.125, out), 100)
            print(f"| {b} | {ctx} | {t_ref:.0f} | {t_k:.0f} | {t_ref / t_k:.2f}x |")
    backend = cpu_backend.CpuAttention(kernel)
    print("\n| prefill chunk rows | torch path (SDPA) us | C++ kernel us | speedup |\n|---|---|---|---|")
    for n in (64, 256, 1024):
        table = torch.randperm(pool, generator=g)[: -(-n // block)]
        meta = AttentionMetadata(torch.zeros(n, dtype=torch.long), 0, None, None, [PrefillChunk(0, n, n, table)])
        q = torch.randn(n, heads, dim, generator=g)
        times = []
        for path in (TorchAttention(), backend):
            step = path.prepare(meta, k_cache)
            times.append(us(lambda: path.forward(q, k_cache, v_cache, step, 0.125), 10))
        print(f"| {n} | {times[0]:.0f} | {times[1]:.0f} | {times[0] / times[1]:.2f}x |")


def engine() -> None:
    from tokenmill import LLM
    from tokenmill.sampling import SamplingParams

    real = cpu_backend.kernel
    print("\n| running | output tok/s, C++ kernel | output tok/s, torch path | ratio |\n|---|---|---|---|")
    for n, out in ((1, 64), (16, 64)):
        rng = random.Random(0)
        prompts = [[rng.randrange(100, 40000) for _ in range(200)] for _ in range(n)]
        params = SamplingParams(temperature=0, max_tokens=out, ignore_eos=True)
        llms = {}
        for name in ("kernel", "torch"):  # the backend is chosen when an engine is built: one each
            cpu_backend.kernel = real if name == "kernel" else (lambda: None)
            llms[name] = LLM("smollm2", max_num_seqs=max(n, 1), enable_prefix_caching=False)
            llms[name].generate(prompts[:2], params)
        cpu_backend.kernel = real
        rates: dict[str, list[float]] = {name: [] for name in llms}
        for _ in range(3):
            for name, llm in llms.items():
                t = time.perf_counter()
                llm.generate(prompts, params)
                rates[name].append(n * out / (time.perf_counter() - t))
        a, b = statistics.median(rates["kernel"]), statistics.median(rates["torch"])
        print(f"| {n} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
        del llms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-engine", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    linears()
    attention()
    if not args.skip_engine:
        engine()


if __name__ == "__main__":
    main()
