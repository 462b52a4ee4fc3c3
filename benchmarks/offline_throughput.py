"""Offline throughput: tokenmill vs transformers' batched generate, same model, same workload,
one run. Default workload (issue 2): 64 prompts x 200 tokens, 128 output tokens, ignore_eos.

    python benchmarks/offline_throughput.py --dtype bfloat16 --quantization none --repeats 3

Prints both throughputs (median over repeats) and the ratio; --profile prints where a
tokenmill decode step goes (scheduler vs model) with 64 requests running.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

import torch

from tokenmill import LLM, SamplingParams
from tokenmill.model.loader import default_model_path


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Skip the first ids: they hold the special tokens.
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


def run_tokenmill(llm: LLM, prompts, output_len: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    # Every repeat starts cold: a prefix-cache hit on the previous repeat's prompts would not
    # be a like-for-like comparison with transformers.
    assert llm.engine.reset_prefix_cache()
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t
    assert all(len(o.outputs[0].token_ids) == output_len for o in outs)
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks
    return len(prompts) * output_len / dt


def load_transformers(dtype: torch.dtype):
    import transformers

    tmp = tempfile.mkdtemp()
    os.symlink(default_model_path(), os.path.join(tmp, "model.gguf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp, gguf_file="model.gguf", dtype=dtype)
    return model.eval()


def run_transformers(model, prompts, output_len: int) -> float:
    ids = torch.tensor(prompts)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            do_sample=False,
            pad_token_id=0,
        )
    dt = time.perf_counter() - t
    assert out.shape[1] == ids.shape[1] + output_len
    return len(prompts) * output_len / dt


def profile_step(llm: LLM, prompts, output_len: int) -> None:
    """Time the scheduler alone against the whole step during the decode phase."""
    engine = llm.engine
    assert engine.reset_prefix_cache()
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"p{i}", p, params)
    sched_times, step_times = [], []
    orig = engine.scheduler.schedule

    def timed_schedule():
        t = time.perf_counter()
        out = orig()
        sched_times.append((time.perf_counter() - t, engine.scheduler.num_running))
        return out

    engine.scheduler.schedule = timed_schedule
    while engine.has_unfinished:
        t = time.perf_counter()
        engine.step()
        step_times.append(time.perf_counter() - t)
    engine.scheduler.schedule = orig
    full = [(s, st) for (s, n), st in zip(sched_times, step_times) if n == len(prompts)]
    sched = statistics.median(s for s, _ in full)
    step = statistics.median(st for _, st in full)
    print(f"decode steps with {len(prompts)} running: {len(full)}; median step {step * 1e3:.1f} ms, "
          f"scheduler {sched * 1e3:.3f} ms = {100 * sched / step:.2f}% of the step")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=200)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--quantization", default="none", help="tokenmill's path: none (same weights as transformers) or auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    llm = LLM("smollm2", dtype=args.dtype, quantization=args.quantization, max_num_seqs=args.num_prompts,
              max_num_batched_tokens=512)
    prompts = make_prompts(args.num_prompts, args.input_len, llm.engine.runner.model.config.vocab_size, 0)
    llm.generate(make_prompts(2, 32, 1000, 1), SamplingParams(max_tokens=4))  # warm-up
    hf = None if args.skip_transformers else load_transformers(getattr(torch, args.dtype))
    if hf is not None:
        run_transformers(hf, [p[:16] for p in prompts[:2]], 4)  # warm-up

    tm, tf = [], []
    for r in range(args.repeats):  # interleaved, so both see the same machine conditions
        tm.append(run_tokenmill(llm, prompts, args.output_len))
        print(f"run {r}: tokenmill {tm[-1]:.1f} tok/s", end="", flush=True)
        if hf is not None:
            tf.append(run_transformers(hf, prompts, args.output_len))
            print(f", transformers {tf[-1]:.1f} tok/s", end="")
        print()
    m_tm = statistics.median(tm)
    print(f"\nworkload: {args.num_prompts} x {args.input_len} in, {args.output_len} out, dtype {args.dtype}, "
          f"tokenmill quantization {args.quantization}, {torch.get_num_threads()} threads")
    print(f"tokenmill     {m_tm:8.1f} output tok/s (median of {len(tm)})")
    if tf:
        m_tf = statistics.median(tf)
        print(f"transformers  {m_tf:8.1f} output tok/s (median of {len(tf)})")
        print(f"ratio         {m_tm / m_tf:8.2f}x")
    if args.profile:
        profile_step(llm, prompts, args.output_len)


if __name__ == "__main__":
    main()
