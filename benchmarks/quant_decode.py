"""Single-request decode speed of the default model: quantized weights (GGUF Q4_1 -> int4
kernel, Q8_0 LM head -> int8 kernel) vs the same weights dequantized to float32, in one run.

    PYTHONPATH=. python benchmarks/quant_decode.py [--model smollm2] [--tokens 64] [--repeats 5] [--threads N]

Per path: median ms per decode step over `repeats` generations of `tokens` tokens each (the
prefill step excluded: its time is taken from a one-token run and subtracted), and the bytes of
weights one decode step reads (every linear incl. the LM head; embedding rows are not counted).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tokenmill import LLM
from tokenmill.model.layers import weight_nbytes
from tokenmill.sampling import SamplingParams

PROMPT = "Once upon a time, in a small village by the sea,"


def decode_ms_per_token(llm: LLM, tokens: int, repeats: int) -> tuple[float, list[float]]:
    def run(n: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        t = time.perf_counter()
        llm.generate([PROMPT], params)
        return time.perf_counter() - t

    run(tokens)  # warm-up: first-call allocations, kernel dispatch caches
    samples = []
    for _ in range(repeats):
        prefill = run(1)  # one step: prefill + first token
        total = run(tokens)
        samples.append((total - prefill) / (tokens - 1) * 1000)
    return statistics.median(samples), samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    results = {}
    for name, quantization in (("float32", "none"), ("quantized", "auto")):
        llm = LLM(args.model, quantization=quantization, dtype="float32")
        nbytes = weight_nbytes(llm.engine.runner.model)
        median, samples = decode_ms_per_token(llm, args.tokens, args.repeats)
        results[name] = {"ms_per_token": median, "samples_ms": samples, "weight_bytes_per_step": nbytes}
        print(f"{name:>9}: {median:7.2f} ms/token (median of {args.repeats}), {nbytes / 2**20:7.1f} MiB of weights read per step")
        del llm

    f, q = results["float32"], results["quantized"]
    speedup = f["ms_per_token"] / q["ms_per_token"]
    ratio = q["weight_bytes_per_step"] / f["weight_bytes_per_step"]
    print(f"speedup {speedup:.2f}x (target >= 2x); quantized reads {ratio:.3f} of float32 bytes (target <= 0.333)")
    print(json.dumps({"threads": torch.get_num_threads(), "tokens": args.tokens, **results, "speedup": speedup, "bytes_ratio": ratio}))


if __name__ == "__main__":
    main()
