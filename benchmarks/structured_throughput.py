"""Structured output cost: 16 concurrent chat requests on the default model, all free vs half
under a JSON schema, same prompts and seeds, one process. Also the first-compile time of a schema.

    python benchmarks/structured_throughput.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

from tokenmill import LLM, SamplingParams
from tokenmill.sampling import StructuredOutput

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 30}, "minItems": 1, "maxItems": 4},
        "bio": {"type": "string", "maxLength": 200},
    },
    "required": ["name", "age", "role", "skills", "bio"],
}


def run(llm: LLM, prompts, params) -> tuple[float, int]:
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks
    return tokens / dt, tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    llm = LLM("smollm2", dtype=args.dtype, max_num_seqs=args.concurrency, enable_prefix_caching=False)
    tok = llm.tokenizer
    prompts = [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": f"Describe user number {i} of a web app as JSON."}]), False)
        for i in range(args.concurrency)
    ]
    free = [SamplingParams(temperature=0.8, seed=i, max_tokens=args.max_tokens) for i in range(args.concurrency)]

    def mixed(salt: str):
        # A fresh schema per repeat (a description differs) so the cache never hides compile cost.
        schema = dict(SCHEMA, description=salt)
        return [
            SamplingParams(temperature=0.8, seed=i, max_tokens=args.max_tokens,
                           structured=StructuredOutput(json=schema) if i % 2 else None)
            for i in range(args.concurrency)
        ]

    t = time.perf_counter()
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, structured=StructuredOutput(json=dict(SCHEMA, description="warm"))))
    print(f"first constrained request (llguidance tokenizer set-up + compile + 2 tokens): {time.perf_counter() - t:.2f} s")
    t = time.perf_counter()
    llm.engine.grammars.submit(StructuredOutput(json=dict(SCHEMA, description="compile-only"))).result()
    print(f"compile of a new schema once set up: {(time.perf_counter() - t) * 1e3:.1f} ms")

    f_tps, m_tps = [], []
    for r in range(args.repeats):
        tps, n = run(llm, prompts, free)
        f_tps.append(tps)
        tps2, n2 = run(llm, prompts, mixed(f"run {r}"))
        m_tps.append(tps2)
        print(f"run {r}: all free {tps:.1f} tok/s ({n} tokens), half constrained {tps2:.1f} tok/s ({n2} tokens)")
    f, m = statistics.median(f_tps), statistics.median(m_tps)
    print(f"\nconcurrency {args.concurrency}, dtype {args.dtype}: free {f:.1f} tok/s, half JSON-schema {m:.1f} tok/s "
          f"-> {100 * m / f:.1f}% (median of {args.repeats})")


if __name__ == "__main__":
    main()
