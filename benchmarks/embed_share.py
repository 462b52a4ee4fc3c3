"""Two models on one machine: does one starve the other? One server serves an LLM (`chat`,
smollm2) and an encoder (`minilm`); four phases, alternated over --repeats rounds:

  chat alone            short streamed chats one after another: TTFT and TPOT
  chat + embed load     the same chats while --embed-clients post batches of embeddings nonstop
  embed alone           single small embedding requests one after another: latency
  embed + long chats    the same requests while --long-clients post long prompts nonstop
                        (prefill-bound: --long-tokens prompt tokens, 1 output token)

Each figure is the median of its phase's samples, then the median over the rounds; the
ratios (with load / alone) say how much the other model's work slows this one's. Prompts and
embedding inputs are random token ids (exact lengths, no prefix-cache hits).

    python benchmarks/embed_share.py --threads 2 --repeats 3                # starts the server
    python benchmarks/embed_share.py --base-url http://127.0.0.1:8000      # a running one
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_bench import cpu_model  # noqa: E402
from liveness_load import start_server  # noqa: E402

CHAT, EMBED = "chat", "minilm"
WORDS = ("river stone garden window candle market letter winter music bridge forest harbor "
         "silver planet violin meadow lantern castle ocean pepper").split()


async def chat_once(http: httpx.AsyncClient, rng: random.Random, max_tokens: int) -> tuple[float, float]:
    """One short streamed chat: (TTFT, TPOT) in seconds."""
    words = " ".join(rng.choice(WORDS) for _ in range(12))
    body = {"model": CHAT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "temperature": 0,
            "messages": [{"role": "user", "content": f"Write a story about {words}."}]}
    start = time.perf_counter()
    stamps = []
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"chat: {r.status_code} {await r.aread()}")
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"]
                if delta and delta[0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError("chat: no tokens streamed")
    tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else 0.0
    return stamps[0] - start, tpot


async def embed_once(http: httpx.AsyncClient, rng: random.Random, inputs: int, tokens: int) -> float:
    # token ids without [CLS]/[SEP] (the server adds them): tokens - 2 each
    body = {"model": EMBED, "input": [[rng.randrange(2000, 29000) for _ in range(tokens - 2)] for _ in range(inputs)]}
    start = time.perf_counter()
    r = await http.post("/v1/embeddings", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"embeddings: {r.status_code} {r.text}")
    return time.perf_counter() - start


async def long_prompt_once(http: httpx.AsyncClient, rng: random.Random, tokens: int) -> None:
    body = {"model": CHAT, "prompt": [rng.randrange(1000, 40000) for _ in range(tokens)], "max_tokens": 1}
    r = await http.post("/v1/completions", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"long prompt: {r.status_code} {r.text}")


async def background(n: int, work, stop: asyncio.Event) -> int:
    """n clients doing `work()` until `stop`; how many calls ended."""
    done = 0

    async def client():
        nonlocal done
        while not stop.is_set():
            await work()
            done += 1

    await asyncio.gather(*(client() for _ in range(n)))
    return done


async def phase(name: str, args, http, rng) -> dict:
    stop = asyncio.Event()
    load = None
    if name == "chat+embed":
        load = asyncio.create_task(background(
            args.embed_clients, lambda: embed_once(http, rng, args.embed_batch, args.embed_tokens), stop))
    elif name == "embed+long":
        load = asyncio.create_task(background(args.long_clients, lambda: long_prompt_once(http, rng, args.long_tokens),
                                              stop))
    if load is not None:
        await asyncio.sleep(args.warmup)  # the load running at full tilt before the first sample
    start = time.perf_counter()
    out: dict = {}
    if name.startswith("chat"):
        samples = [await chat_once(http, rng, args.chat_max_tokens) for _ in range(args.chats)]
        out = {"ttft_s": statistics.median(s[0] for s in samples), "tpot_s": statistics.median(s[1] for s in samples)}
    else:
        out = {"latency_s": statistics.median([await embed_once(http, rng, args.probe_inputs, args.probe_tokens)
                                               for _ in range(args.embeds)])}
    elapsed = time.perf_counter() - start
    stop.set()
    if load is not None:
        out["load_calls_per_s"] = await load / elapsed
    return out


async def run(args, base_url: str) -> dict:
    rng = random.Random(args.seed)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    names = ["chat", "chat+embed", "embed", "embed+long"]
    rounds: dict[str, list[dict]] = {n: [] for n in names}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=600) as http:
        await chat_once(http, rng, 2)  # warm both models up
        await embed_once(http, rng, 1, 16)
        for r in range(args.repeats):
            for name in (names if r % 2 == 0 else names[::-1]):  # alternate: drift hits both sides
                rounds[name].append(await phase(name, args, http, rng))
                print(f"round {r} {name}: {rounds[name][-1]}", flush=True)
    return {name: {k: statistics.median(d[k] for d in ds) for k in ds[0]} for name, ds in rounds.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=None, help="a running server with models 'chat' and 'minilm' (default: start one)")
    p.add_argument("--port", type=int, default=8331)
    p.add_argument("--threads", type=int, default=2, help="--num-threads of the server this script starts")
    p.add_argument("--api-key", default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chats", type=int, default=6, help="chats measured per phase")
    p.add_argument("--chat-max-tokens", type=int, default=24)
    p.add_argument("--embeds", type=int, default=10, help="embedding requests measured per phase")
    p.add_argument("--probe-inputs", type=int, default=1, help="inputs in each measured embedding request")
    p.add_argument("--probe-tokens", type=int, default=16)
    p.add_argument("--embed-clients", type=int, default=2, help="clients of the embedding load")
    p.add_argument("--embed-batch", type=int, default=64, help="inputs per request of the embedding load")
    p.add_argument("--embed-tokens", type=int, default=128, help="tokens per input of the embedding load")
    p.add_argument("--long-clients", type=int, default=2, help="clients of the long-prompt chat load")
    p.add_argument("--long-tokens", type=int, default=1024, help="prompt tokens of the long-prompt load")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds a load runs before the first sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[], help="more flags for tokenmill serve (last)")
    args = p.parse_args()
    report = {"cpu": cpu_model(), "cores": os.cpu_count(),
              "args": {k: v for k, v in vars(args).items() if k not in ("api_key",)}}
    report.update(measure(args))
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def measure(args) -> dict:
    """The four phases on one server (started here unless --base-url), with the load average
    around them and the with/alone ratios."""
    proc, base_url = None, args.base_url
    if base_url is None:
        serve = argparse.Namespace(port=args.port, serve_args=[
            "--model", f"{CHAT}=smollm2", "--model", EMBED, "--num-threads", str(args.threads), *args.serve_args])
        proc, base_url = start_server(serve)
    load_before = os.getloadavg()
    try:
        figures = asyncio.run(run(args, base_url))
    finally:
        stop_server(proc)
    return {"load_before": load_before, "load_after": os.getloadavg(), "figures": figures,
            "ratios": {"chat_ttft_with_embed_load": figures["chat+embed"]["ttft_s"] / figures["chat"]["ttft_s"],
                       "chat_tpot_with_embed_load": figures["chat+embed"]["tpot_s"] / figures["chat"]["tpot_s"],
                       "embed_latency_with_long_chats": figures["embed+long"]["latency_s"] / figures["embed"]["latency_s"]}}


def stop_server(proc) -> None:
    if proc is not None:  # None: a server this script did not start
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    raise SystemExit(main())
