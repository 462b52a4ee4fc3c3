"""KV cache dtypes (--kv-cache-dtype) on the default model, in one run: per dtype the tokens the
default KV memory holds, decode speed at long context, perplexity, and the resident memory of
`tokenmill serve` after start.

    PYTHONPATH=. python benchmarks/kv_dtype.py [--dtypes float32,bfloat16,float16,int8]
        [--context 2048] [--batch 1,4] [--tokens 32] [--repeats 3] [--parts kernel,pool,decode,perplexity,rss]

- kernel: the C++ attention kernel alone, one layer of SmolLM2's shape (9 heads, 3 KV heads, 64),
  `batch` sequences of `context` keys each, ms per call (median of 15 rounds of 10 calls, the
  dtypes interleaved so that load drifts hit them alike).
- pool: the engine's KV tokens at the default --kv-cache-memory (512 MiB).
- decode: ms per decode step with `batch` requests of `context`-token prompts (distinct
  prompts, so every request reads its own KV), median of `repeats`; the prompts are prefilled
  once and then found in the prefix cache, and a one-token run's time (prefill of the last
  partial block + first token) is subtracted, as benchmarks/quant_decode.py does.
- perplexity: tests/model/data/perplexity.txt on the default model (weights dequantized, so only
  the pool differs), attention in the C++ kernel; next-token argmax agreement with float32 KV.
- rss: VmRSS of a `tokenmill serve` process once /health answers.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx
import torch

from tokenmill import LLM
from tokenmill.sampling import SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def decode_ms(llm: LLM, prompts: list[list[int]], tokens: int, repeats: int) -> tuple[float, list[float]]:
    def run(n: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        t = time.perf_counter()
        llm.generate(prompts, params)
        return time.perf_counter() - t

    run(2)  # prefills the prompts into the prefix cache, warms the kernels
    samples = []
    for _ in range(repeats):
        first = run(1)
        total = run(tokens)
        samples.append((total - first) / (tokens - 1) * 1000)
    return statistics.median(samples), samples


def long_prompts(llm: LLM, batch: int, context: int) -> list[list[int]]:
    vocab = llm.engine.vocab_size
    g = torch.Generator().manual_seed(0)
    # Random ids: the attention cost is the same for any text, and no two prompts share a block.
    return [torch.randint(100, vocab - 100, (context,), generator=g).tolist() for _ in range(batch)]


def kernel_ms(dtypes: list[str], batch: int, context: int) -> dict[str, float]:
    from tokenmill.model.attention import cpu_backend
    from tokenmill.model.attention.kv_dtype import to_pool

    kernel = cpu_backend.kernel()
    g = torch.Generator().manual_seed(0)
    block = 16
    blocks = batch * context // block
    k, v = torch.randn(blocks, 3, block, 64, generator=g), torch.randn(blocks, 3, block, 64, generator=g)
    q = torch.randn(batch, 9, 64, generator=g)
    tables, rows, lens = torch.arange(blocks).view(batch, -1), torch.arange(batch), torch.full((batch,), context)
    pools = {d: (to_pool(k, getattr(torch, d)), to_pool(v, getattr(torch, d))) for d in dtypes}
    samples: dict[str, list[float]] = {d: [] for d in dtypes}
    out = torch.empty_like(q)
    for _ in range(15):
        for d, (kc, vc) in pools.items():
            t = time.perf_counter()
            for _ in range(10):
                kernel(q, kc, vc, tables, rows, lens, 0.125, out)
            samples[d].append((time.perf_counter() - t) / 10 * 1000)
    return {d: statistics.median(s) for d, s in samples.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_rss_mib(kv_dtype: str, timeout: float = 600) -> float:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenmill", "serve", "--port", str(port), "--kv-cache-dtype", kv_dtype],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"serve --kv-cache-dtype {kv_dtype} exited with {proc.returncode}")
            time.sleep(0.5)
        else:
            raise TimeoutError("serve did not turn healthy")
        time.sleep(1)
        with open(f"/proc/{proc.pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kb / 1024
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16,float16,int8")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", default="pool,decode,perplexity,rss")
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args()
    dtypes = args.dtypes.split(",")
    parts = set(args.parts.split(","))
    batches = [int(b) for b in args.batch.split(",")]
    results: dict[str, dict] = {d: {} for d in dtypes}

    if "kernel" in parts:
        for b in batches:
            for d, ms in kernel_ms(dtypes, b, args.context).items():
                results[d][f"kernel_ms_batch{b}"] = ms
                print(f"{d:>9}: attention kernel, one layer, {b} x {args.context} keys: {ms:.2f} ms", flush=True)

    if parts & {"pool", "decode"}:
        for d in dtypes:
            # Room for the longest batch; the default 512 MiB is what "pool" reports.
            llm = LLM("smollm2", kv_cache_dtype=d, max_model_len=args.context + args.tokens + 16)
            tokens = llm.engine.kv.num_blocks * llm.engine.config.cache.block_size
            results[d]["pool_tokens"] = tokens
            print(f"{d:>9}: {tokens} KV tokens in {llm.engine.config.cache.kv_cache_memory_bytes / 2**20:.0f} MiB", flush=True)
            if "decode" in parts:
                for b in batches:
                    median, samples = decode_ms(llm, long_prompts(llm, b, args.context), args.tokens, args.repeats)
                    results[d][f"decode_ms_batch{b}"] = {"median": median, "samples": samples}
                    print(f"{d:>9}: batch {b} at {args.context} tokens of context: {median:.1f} ms/step "
                          f"({b * 1000 / median:.1f} tok/s; samples {', '.join(f'{s:.1f}' for s in samples)})", flush=True)
            del llm

    if "perplexity" in parts:
        sys.path.insert(0, ROOT)
        from tests.model import real  # the perplexity text and the model the tests measure

        for d in dtypes:
            ppl_f, ppl, agree, n = real.perplexity_vs_float_kv(getattr(torch, d))
            results[d]["perplexity"] = {"float32_kv": ppl_f, "this_kv": ppl, "agreement": agree, "tokens": n}
            print(f"{d:>9}: perplexity {ppl:.4f} (float32 KV {ppl_f:.4f}, {100 * (ppl / ppl_f - 1):+.3f}%), "
                  f"next-token agreement {agree:.3f} over {n} tokens", flush=True)

    if "rss" in parts:
        for d in dtypes:
            rss = serve_rss_mib(d)
            results[d]["serve_rss_mib"] = rss
            print(f"{d:>9}: tokenmill serve RSS after start {rss:.0f} MiB", flush=True)

    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
