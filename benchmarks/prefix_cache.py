"""Prefix caching on vs off, same model, same workload, one run.

    python benchmarks/prefix_cache.py --dtype bfloat16 --repeats 3

Workloads: (1) N requests sharing a ~400-token system prompt, each with a short distinct
question (max_tokens 32, greedy, ignore_eos); (2) a 4-turn chat where each turn resends the
whole history (previous prompt + answer + a new user message). Each repeat starts with an
empty cache (reset_prefix_cache). Prints wall time, prefill tokens computed (medians over
repeats), the speedup and the hit rate; outputs must be identical on and off.
"""

from __future__ import annotations

import argparse
import statistics
import time

from tokenmill import LLM, SamplingParams

SYSTEM = (
    "You are a careful, concise assistant for a company that builds serving software for large "
    "language models. Answer in plain English, cite the relevant part of the documentation when "
    "you can, and say so when you do not know. The product keeps the key and value tensors of "
    "every request in a pool of fixed-size blocks; a scheduler admits new requests at every step "
    "and mixes prefill chunks with decode tokens under one token budget; when the pool runs out it "
    "preempts the request that loses the least work and recomputes it later. Requests that share "
    "a prefix share its blocks. The server speaks the OpenAI API (completions and chat "
    "completions, streaming or not), exposes Prometheus metrics, and can be benchmarked with its "
    "own load generator. Configuration lives on the command line; every option has a default "
    "that suits a single machine. Logs are structured, one line per event, and never contain "
    "prompt text unless debug logging is on. "
)
QUESTIONS = [
    "What is a KV block?", "How does preemption work?", "Which API does the server speak?",
    "Where are logs written?", "Can I stream tokens?", "What is a token budget?",
    "How are metrics exposed?", "What happens when the pool is full?", "Is there a load generator?",
    "Do requests share memory?", "What is a prefill chunk?", "How do I change the defaults?",
    "Does it support chat?", "Are prompts logged?", "What is continuous batching?",
    "How big is a block?", "Who decides which request runs?", "Can it run on one machine?",
    "What is decode?", "How is work recomputed?", "Which metrics matter most?",
    "What does admission mean?", "How long can a prompt be?", "What is a prefix?",
    "Why fixed-size blocks?", "Can I turn caching off?", "What is the hit rate?",
    "How do I benchmark it?", "What is a system prompt?", "Does it batch decodes?",
    "How are errors reported?", "What is greedy sampling?",
]
CHAT_USER = [
    "Explain how the scheduler picks which requests run in a step.",
    "And what happens to a request that gets preempted?",
    "Does the prefix cache help with that?",
    "Summarise the three answers in two sentences.",
]


class PrefillCounter:
    """Wraps the runner: counts prompt tokens actually computed (prefill work)."""

    def __init__(self, llm: LLM):
        self.tokens = 0
        execute = llm.engine.runner.execute

        requests = llm.engine.scheduler.requests

        def wrapped(record):
            for s in record.seqs:
                prompt_len = requests[s.request_id].num_prompt_tokens
                self.tokens += max(0, min(s.start + s.num_computed, prompt_len) - s.start)
            return execute(record)

        llm.engine.runner.execute = wrapped


def shared_prefix(llm: LLM, n: int, max_tokens: int):
    tok = llm.tokenizer
    prompts = [tok.encode(SYSTEM * 2 + "\nQuestion: " + QUESTIONS[i % len(QUESTIONS)] + f" ({i})\nAnswer:") for i in range(n)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs], sum(map(len, prompts)), sum(o.num_cached_tokens for o in outs)


def chat(llm: LLM, max_tokens: int):
    tok = llm.tokenizer
    prompt = tok.encode(SYSTEM * 2)
    answers, queried, cached = [], 0, 0
    for user in CHAT_USER:
        prompt = prompt + tok.encode(f"\nUser: {user}\nAssistant:", False)
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))[0]
        answers.append(out.outputs[0].token_ids)
        queried += len(prompt)
        cached += out.num_cached_tokens
        prompt = prompt + out.outputs[0].token_ids
    return answers, queried, cached


def measure(llm: LLM, counter: PrefillCounter, fn, repeats: int):
    times, prefill, result = [], [], None
    for _ in range(repeats):
        assert llm.engine.reset_prefix_cache()
        counter.tokens = 0
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
        prefill.append(counter.tokens)
        assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks
    return statistics.median(times), statistics.median(prefill), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    llms = {}
    for mode, cache in (("off", False), ("on", True)):
        llm = LLM(args.model, dtype=args.dtype, enable_prefix_caching=cache)
        llms[mode] = (llm, PrefillCounter(llm))
    # warm-up (allocator, kernels) on both, outside the measurement
    for llm, _ in llms.values():
        llm.generate(["warm up"], SamplingParams(temperature=0, max_tokens=4))

    workloads = {
        f"shared prefix ({args.requests} requests)": lambda llm: shared_prefix(llm, args.requests, args.max_tokens),
        "4-turn chat": lambda llm: chat(llm, args.max_tokens),
    }
    for name, fn in workloads.items():
        res = {}
        for mode, (llm, counter) in llms.items():
            res[mode] = measure(llm, counter, lambda: fn(llm), args.repeats)
        (t_off, p_off, (out_off, queried, _)), (t_on, p_on, (out_on, _, cached)) = res["off"], res["on"]
        # bf16 rounding depends on the batch shape (a cached prefix changes it): report, don't assert.
        same = sum(a == b for a, b in zip(out_on, out_off))
        print(f"{name}: prompt tokens {queried}, cached {cached} (hit rate {cached / queried:.1%}); "
              f"identical outputs {same}/{len(out_on)}", flush=True)
        print(f"  prefill tokens computed: off {p_off:.0f}, on {p_on:.0f} ({p_off / max(p_on, 1):.1f}x fewer)")
        print(f"  wall time (median of {args.repeats}): off {t_off:.2f} s, on {t_on:.2f} s -> {t_off / t_on:.2f}x faster", flush=True)


if __name__ == "__main__":
    main()
