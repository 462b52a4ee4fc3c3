"""Record (or compare) the exact outputs of a fixed set of requests: greedy and seeded sampled
runs on the default model and the tiny test models, under several engine settings.

A refactor of the engine must not change a single token. Record before, compare after:

    python benchmarks/greedy_fingerprint.py --out /tmp/before.json
    python benchmarks/greedy_fingerprint.py --compare /tmp/before.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill import LLM, SamplingParams  # noqa: E402

CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Repeat exactly: the quick brown fox jumps over the lazy dog, the quick brown fox jumps over the lazy dog.",
    "List three prime numbers and explain why they are prime.",
]

# name -> engine settings on the default model
DEFAULT_MODEL_RUNS = {
    "default": {},
    "no_prefix_cache": {"enable_prefix_caching": False},
    "chunked_prefill_32": {"max_num_batched_tokens": 32},
    "ngram_spec": {"speculative_method": "ngram"},
    "tiny_pool": {"num_kv_blocks": 24},  # forces preemptions
}


def _record(outs) -> list[dict]:
    return [
        {"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
        for out in outs for c in out.outputs
    ]


def default_model_runs() -> dict:
    results = {}
    greedy = SamplingParams(temperature=0, max_tokens=48)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=32, n=2)
    stopped = SamplingParams(temperature=0, max_tokens=48, stop=[","])
    for name, settings in DEFAULT_MODEL_RUNS.items():
        llm = LLM("smollm2", **settings)
        messages = [[{"role": "user", "content": c}] for c in CHATS]
        results[f"smollm2/{name}/greedy"] = _record(llm.chat(messages, greedy))
        results[f"smollm2/{name}/seeded"] = _record(llm.chat(messages[:2], seeded))
        results[f"smollm2/{name}/stop"] = _record(llm.chat(messages[:2], stopped))
    return results


def tiny_model_runs() -> dict:
    from tests.tiny import loaded_from_hf, tiny_hf_model

    results = {}
    prompts = [[5, 17, 99, 3, 250], list(range(40, 90)), [7] * 20]
    for arch in ("llama", "qwen2", "qwen3"):
        loaded = loaded_from_hf(tiny_hf_model(arch))
        for name, settings in {"default": {}, "chunked_8": {"max_num_batched_tokens": 8}}.items():
            llm = LLM(loaded=loaded, num_kv_blocks=64, block_size=4, **settings)
            outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
            results[f"tiny-{arch}/{name}/greedy"] = _record(outs)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help="write the outputs here")
    g.add_argument("--compare", help="compare with outputs recorded earlier")
    args = p.parse_args()
    results = tiny_model_runs() | default_model_runs()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"{len(results)} runs recorded in {args.out}")
        return 0
    before = json.loads(Path(args.compare).read_text())
    bad = [k for k in before if before[k] != results.get(k)]
    for k in bad:
        print(f"DIFFERS: {k}")
    print(f"{len(before) - len(bad)}/{len(before)} runs token-identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
