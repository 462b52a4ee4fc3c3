"""The CPU kernel choices, measured: (1) tokenmill's int4/int8 linears (qkernels.py) by row
count against what ran before them (torch's int4 kernel for generated rows, a bfloat16 GEMM over
a dense copy for prompt rows and the LM head), with the 1-row GB/s against this machine's
measured read bandwidth (the floor), (2) the C++ attention kernel vs the torch path for decodes
by batch and context, and for one prefill chunk by length (the torch path's SDPA), (3) the
engine with and without the C++ attention kernel on the default model (greedy, ignore_eos,
engines interleaved, median of 3).

    python benchmarks/cpu_kernels.py [--threads 2] [--skip-engine] [--skip-attention]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from tokenmill.model.attention import AttentionMetadata, PrefillChunk, TorchAttention, cpu_backend
from tokenmill.model.gguf_blocks import QuantizedWeight
from tokenmill.model.layers import weight_nbytes
from tokenmill.model.quant import from_column_groups, make_linear


def us(fn, n: int = 30) -> float:
    """Median microseconds of n calls after 3 warm-ups (the machine is shared: medians)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def bandwidth_gbs() -> float:
    """This machine's read bandwidth: a sum over 512 MiB of float32 (far beyond any cache),
    median of 5, at the current thread count."""
    buf = torch.ones(128 * 2**20)
    return buf.numel() * 4 / us(lambda: buf.sum(), 5) / 1e3


def torch_int4(lin):
    """Before issue 21: torch's int4 kernel over the same values (bf16 activations, group 32)."""
    scale = from_column_groups(lin.scale, lin.out_features).float()
    minimum = from_column_groups(lin.minimum, lin.out_features).float()
    q = (lin.dequantized() - minimum.repeat_interleave(32, 1)) / scale.repeat_interleave(32, 1)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.round().to(torch.int32).contiguous(), 1)
    sz = torch.stack([scale.t(), (minimum + 8 * scale).t()], -1).bfloat16().contiguous()
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, 32, sz).float()


@torch.inference_mode()
def linears() -> None:
    gbs = bandwidth_gbs()
    print(f"read bandwidth (sum over 512 MiB float32, {torch.get_num_threads()} threads): {gbs:.1f} GB/s\n")
    print("| linear (out x in) | rows | tokenmill kernel us | GB/s (1 row) | bf16 dense copy us | torch int4 us | dense / kernel |")
    print("|---|---|---|---|---|---|---|")
    shapes = {  # SmolLM2-135M's linears (q|k|v and gate|up stacked) and its Q8_0 LM head
        "Q4_1 q|k|v 960x576": (Q.Q4_1, 960, 576), "Q4_1 gate|up 3072x576": (Q.Q4_1, 3072, 576),
        "Q4_1 down 576x1536": (Q.Q4_1, 576, 1536), "Q8_0 LM head 49152x576": (Q.Q8_0, 49152, 576),
    }
    for name, (qtype, n, k) in shapes.items():
        w = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32)
        lin = make_linear(QuantizedWeight(quantize(w, qtype), qtype, (n, k)), None, torch.float32, "auto", 32)
        dense = lin.dequantized().bfloat16()
        old = torch_int4(lin) if qtype == Q.Q4_1 else None
        reps = 5 if n > 10000 else 20
        for m in (1, 16, 64, 256):
            x = torch.randn(m, k)
            t_k = us(lambda: lin(x), reps)
            t_d = us(lambda: F.linear(x.bfloat16(), dense).float(), reps)
            t_o = f"{us(lambda: old(x), reps):.0f}" if old is not None and m <= 64 else "-"
            rate = f"{weight_nbytes(lin) / t_k / 1e3:.1f}" if m == 1 else ""
            print(f"| {name} | {m} | {t_k:.0f} | {rate} | {t_d:.0f} | {t_o} | {t_d / t_k:.2f}x |")


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
    ap.add_argument("--skip-attention", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    linears()
    if not args.skip_attention:
        attention()
    if not args.skip_engine:
        engine()


if __name__ == "__main__":
    main()
