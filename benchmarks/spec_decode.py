"""Speculative decoding on the default model: TPOT with and without drafts, in one run.

    PYTHONPATH=. python benchmarks/spec_decode.py [--repeats 3] [--max-tokens 192] [--k 4]
        [--draft-layers 24] [--sweep 1,2,4,8,16] [--no-tpot] [--json out.json]

Engines share the loaded weights (serve defaults: float32 activations over the GGUF's Q4_1):
  plain  - no speculation
  ngram  - prompt lookup, k drafts
  draft  - a draft built for the test: the target's own first --draft-layers layers plus its
           final norm and LM head (layer skipping), so it shares the tokenizer by construction
Tasks, one request at a time (concurrency 1):
  copy        - greedy: correct the typos in a ~300-token text (the answer copies its input)
  create      - greedy: write a story (a small model's greedy text ends up repeating itself)
  create-t0.8 - the story sampled at temperature 0.8 (nothing to copy)
TPOT per request = (finish - first token) / (output tokens - 1); median over repeats, the
engines interleaved within each repeat so that machine noise hits them alike. The sweep runs
c requests of --sweep-task at once (speculation kept on at any batch size) and reports the median
output tokens/s of ngram over plain, to find the concurrency where speculation stops paying.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from tokenmill import LLM
from tokenmill.model.loader import load_model
from tokenmill.sampling import SamplingParams

TEXT = (
    "The old lighthouse on the northern cape was built in 1871, when ships still carried timber and "
    "salt along the coast. For more then a century a keeper lived in the small stone house at its "
    "foot, climbing the hundred and twelve steps every evening to light the lamp and every morning "
    "to put it out. The last keeper, a quiet man named Arvid Holm, kept a log of every ship he saw, "
    "the weather at dawn and dusk, and the birds that rested on the gallery during the autum storms. "
    "When the light was automated in 1989 he refused to leave, and the coast authority let him stay "
    "as a caretaker untill his death nine years later. His logs, forty-one notebooks in a neat and "
    "slanted hand, are now kept in the town library, where students of climate and of local history "
    "read them side by side. They show that the spring storms came earlier each decade, that the "
    "herring boats vanished in the winter of 1962, and that a pair of white-tailed eagles returned to "
    "the same ledge every year from 1974 onward. Visitors today can climb the tower on summer "
    "weekends. The lamp no longer turns, but the view across the islands is the same one Holm "
    "described on his first evening: grey water, a line of rocks like the back of a sleeping animal, "
    "and far out, the faint smoke of a ship he could not yet name."
)
STORY = (
    "Write a long story about a robot who learns to paint. Describe the robot, its first "
    "attempts, its teacher, and the exhibition at the end."
)
# task -> (prompt, temperature). Greedy output of a 135M model drifts into repeating itself,
# which prompt lookup then copies; sampled at 0.8 it rarely repeats: the nothing-to-copy case.
TASKS = {
    "copy": ("Rewrite the following text exactly, only correcting its spelling mistakes:\n\n" + TEXT, 0.0),
    "create": (STORY, 0.0),
    "create-t0.8": (STORY, 0.8),
}


def chat_prompt(llm: LLM, text: str) -> list[int]:
    return llm.tokenizer.encode(
        llm.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True),
        add_special_tokens=False,
    )


def tpot_ms(llm: LLM, prompt: list[int], max_tokens: int, temperature: float = 0.0) -> tuple[float, int]:
    # Sampled runs are unseeded (a seeded request never speculates) and run to max_tokens, so
    # that each engine's TPOT averages over the same length.
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=temperature > 0)
    out = llm.generate([prompt], params)[0]
    m, n = out.metrics, len(out.outputs[0].token_ids)
    return (m.finished_time - m.first_token_time) / max(1, n - 1) * 1000, n


def throughput(llm: LLM, prompts: list[list[int]], max_tokens: int, temperature: float = 0.0) -> float:
    t = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True))
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--draft-layers", type=int, default=24)
    ap.add_argument("--sweep", default="1,2,4,8,16")
    ap.add_argument("--sweep-tokens", type=int, default=96)
    ap.add_argument("--sweep-repeats", type=int, default=3)
    ap.add_argument("--sweep-task", choices=list(TASKS), default="copy")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-tpot", action="store_true", help="only the concurrency sweep")
    ap.add_argument("--tasks", default="copy,create,create-t0.8", help=f"of {list(TASKS)}")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model("smollm2")
    draft = dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, num_layers=args.draft_layers))
    spec = dict(num_speculative_tokens=args.k, speculative_disable_by_batch_size=1000)
    engines = {
        "plain": LLM("smollm2", loaded=loaded),
        "ngram": LLM("smollm2", loaded=loaded, speculative_method="ngram", **spec),
        "draft": LLM("smollm2", loaded=loaded, draft_loaded=draft, speculative_method="draft", **spec),
    }
    prompts = {task: chat_prompt(engines["plain"], text) for task, (text, _) in TASKS.items()}
    for llm in engines.values():  # warm-up
        tpot_ms(llm, prompts["create"], 8)

    results: dict = {"tpot_ms": {}, "output_tokens": {}, "acceptance": {}, "sweep": {}}
    tasks = [] if args.no_tpot else args.tasks.split(",")
    for task in tasks:
        prompt, temperature = prompts[task], TASKS[task][1]
        samples = {name: [] for name in engines}
        for _ in range(args.repeats):
            for name, llm in engines.items():
                before = dataclasses.replace(llm.engine.stats)
                ms, n = tpot_ms(llm, prompt, args.max_tokens, temperature)
                samples[name].append(ms)
                results["output_tokens"].setdefault(task, {})[name] = n
                s = llm.engine.stats
                drafted = s.spec_num_draft_tokens - before.spec_num_draft_tokens
                accepted = s.spec_num_accepted_tokens - before.spec_num_accepted_tokens
                if drafted:
                    results["acceptance"].setdefault(task, {})[name] = accepted / drafted
        results["tpot_ms"][task] = {name: statistics.median(v) for name, v in samples.items()}
        base = results["tpot_ms"][task]["plain"]
        for name, v in samples.items():
            med = statistics.median(v)
            acc = results["acceptance"].get(task, {}).get(name)
            print(f"{task:>6} {name:>5}: TPOT {med:6.2f} ms (runs {', '.join(f'{x:.2f}' for x in v)}), "
                  f"{base / med:4.2f}x vs plain, {results['output_tokens'][task][name]} tokens"
                  + (f", acceptance {acc:.1%}" if acc is not None else ""))

    sweep_prompt = prompts[args.sweep_task]
    for c in [int(x) for x in args.sweep.split(",") if x]:
        runs = {"plain": [], "ngram": []}
        for _ in range(args.sweep_repeats):
            for name in runs:
                runs[name].append(throughput(engines[name], [sweep_prompt] * c, args.sweep_tokens, TASKS[args.sweep_task][1]))
        row = {name: statistics.median(v) for name, v in runs.items()}
        results["sweep"][c] = row
        print(f"concurrency {c:>2}: plain {row['plain']:7.1f} tok/s, ngram {row['ngram']:7.1f} tok/s, "
              f"ratio {row['ngram'] / row['plain']:4.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
