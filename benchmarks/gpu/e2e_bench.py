"""End-to-end GPU benchmark (issue 9): Llama-shaped models with random bf16 weights.

    python benchmarks/gpu/e2e_bench.py [--shapes 1b,8b] [--hf-seconds 45] [--json out.json]
    python benchmarks/gpu/e2e_bench.py --smoke      # CPU, tiny shapes: checks the script runs

Performance does not depend on the weights' values, so the models are random (ignore_eos).
In one run, on one GPU:
  floor     device-to-device copy bandwidth (bytes read + written / time) and a bf16 8192^3
            matmul, the ceilings everything is compared with
  decode    batch 1, 128-token prompt, 256 greedy tokens: TPOT vs the floor = weight bytes
            read per step / measured bandwidth (1B and 8B shapes)
  thruput   256 requests, input and output lengths uniform in 100..1024 (nano-vllm's and
            vLLM's published workload), greedy: output tok/s for the 1B shape, vs transformers'
            generate on the same model and GPU (batches of 64, left-padded, run for at most
            --hf-seconds; its rate counts only the tokens each request asked for), and as
            fractions of the compute and bandwidth ceilings
A table is printed last.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

from dataclasses import dataclass

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# The GPU image has no gguf: nothing here may import a module that needs it (gguf.py, gguf_blocks.py).
from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.config import ModelConfig  # noqa: E402
from tokenmill.model.layers import weight_nbytes  # noqa: E402
from tokenmill.model.tokenizer import Tokenizer  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES = {
    "1b": ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                      num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
                      max_position_embeddings=131072, tie_word_embeddings=True),
    "8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                      num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
                      max_position_embeddings=8192),
    "smoke": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_position_embeddings=4096),
}


def word_tokenizer(vocab_size: int) -> Tokenizer:
    """A tokenizer over the model's ids (decoding only matters: prompts are given as ids)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    return Tokenizer(HFTokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0")))


def random_weights(cfg: ModelConfig, device, dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    weights = {}
    for name, shape in cfg.weight_shapes().items():
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(shape, device=device, dtype=dtype)
        else:
            weights[name] = (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype)
    return weights


def hf_model(cfg: ModelConfig, device, dtype):
    """transformers' Llama with its own random init, made on the device; tokenmill then runs
    the very same tensors (see hf_weights)."""
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
    )
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    return model.eval()


def hf_weights(model, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    weights = dict(model.state_dict())
    if cfg.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return weights


def timed(fn, device, repeats: int = 10) -> float:
    """Median seconds of fn() after warm-up."""
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ceilings(device, smoke: bool) -> dict:
    n = 2**20 if smoke else 2**30  # bytes
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    copy_s = timed(lambda: y.copy_(x), device)
    m = 256 if smoke else 8192
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    mm_s = timed(lambda: a @ a, device)
    del x, y, a
    return {"copy_bytes_per_s": 2 * n / copy_s, "matmul_flops_per_s": 2 * m**3 / mm_s}


@dataclass
class Loaded:
    config: ModelConfig
    weights: dict
    tokenizer: Tokenizer


def engine(cfg, weights, device, dtype, **config) -> LLM:
    loaded = Loaded(cfg, weights, word_tokenizer(cfg.vocab_size))
    return LLM("random", loaded=loaded, device=device.type, dtype=dtype, max_model_len=2048, **config)


def free(device) -> None:
    gc.collect()  # whatever cycles still hold GPU tensors
    if device.type == "cuda":
        torch.cuda.empty_cache()


def decode_tpot(llm: LLM, vocab: int, out_tokens: int) -> float:
    rng = random.Random(1)
    prompt = [rng.randrange(vocab) for _ in range(128)]
    params = SamplingParams(temperature=0, max_tokens=out_tokens, ignore_eos=True)
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # warm-up
    tpots = []
    for _ in range(3):
        out = llm.generate([prompt], params)[0]
        m = out.metrics
        tpots.append((m.finished_time - m.first_token_time) / (len(out.outputs[0].token_ids) - 1))
    return statistics.median(tpots)


def workload(vocab: int, n: int, lo: int, hi: int, seed: int = 0):
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(rng.randint(lo, hi))], rng.randint(lo, hi)) for _ in range(n)]


def tokenmill_throughput(llm: LLM, reqs) -> dict:
    prompts = [p for p, _ in reqs]
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in reqs]
    steps0 = llm.engine.stats.num_steps
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"wall_s": wall, "output_tokens": out_tokens, "input_tokens": sum(len(p) for p in prompts),
            "steps": llm.engine.stats.num_steps - steps0}


def hf_throughput(model, reqs, device, batch: int, seconds: float) -> dict:
    done_tokens, t0 = 0, time.perf_counter()
    processed = 0
    for i in range(0, len(reqs), batch):
        chunk = reqs[i : i + batch]
        width = max(len(p) for p, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, (p, _) in enumerate(chunk):  # left padding
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        new = max(o for _, o in chunk)
        with torch.inference_mode():
            model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        done_tokens += sum(o for _, o in chunk)
        processed += len(chunk)
        if time.perf_counter() - t0 > seconds:
            break
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "output_tokens": done_tokens, "requests": processed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1b,8b")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--hf-seconds", type=float, default=45.0)
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, few requests")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = "float32" if args.smoke else "bfloat16"
    tdtype = getattr(torch, dtype)
    shapes = ["smoke"] if args.smoke else args.shapes.split(",")
    lo, hi = (10, 40) if args.smoke else (100, 1024)
    n_requests = 8 if args.smoke else args.requests
    out_tokens = 16 if args.smoke else 256
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "ceilings": ceilings(device, args.smoke)}
    bw, flops = result["ceilings"]["copy_bytes_per_s"], result["ceilings"]["matmul_flops_per_s"]
    # Rows are printed as they come and the JSON rewritten after each: a run cut short by its
    # time limit still leaves what it measured.
    print(f"\ndevice {result['device']}: copy {bw / 1e12:.2f} TB/s (read + write), bf16 matmul {flops / 1e12:.0f} TFLOP/s")
    print("| shape | run | result | detail | vs |")
    print("|---|---|---|---|---|", flush=True)

    def emit(row: str) -> None:
        print(row, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))

    for shape in shapes:
        cfg = SHAPES[shape]
        compare = shape in ("1b", "smoke")  # the throughput run, against transformers
        r = result[shape] = {"shape": shape}
        model = None
        if compare:
            try:
                model = hf_model(cfg, device, tdtype)
            except ImportError as e:
                emit(f"| {shape} | transformers | not installed ({e}) | | |")
        weights = hf_weights(model, cfg) if model is not None else random_weights(cfg, device, tdtype)
        t = time.perf_counter()
        # Only the throughput run needs a big batch (and its ladder of CUDA graphs).
        llm = engine(cfg, weights, device, dtype, max_num_seqs=256 if compare else 4, max_num_batched_tokens=8192)
        wbytes = weight_nbytes(llm.engine.runner.model)
        r |= {"build_s": time.perf_counter() - t, "weight_bytes": wbytes, "kv_blocks": llm.engine.kv.num_blocks}
        tpot = decode_tpot(llm, cfg.vocab_size, out_tokens)
        floor = wbytes / bw
        r |= {"tpot_s": tpot, "floor_s": floor}
        emit(f"| {shape} | decode batch 1 | TPOT {tpot * 1e3:.2f} ms | floor {floor * 1e3:.2f} ms "
             f"({wbytes / 2**30:.2f} GiB at {bw / 1e12:.2f} TB/s) | {tpot / floor:.2f}x floor |")
        if compare:
            reqs = workload(cfg.vocab_size, n_requests, lo, hi)
            tm = tokenmill_throughput(llm, reqs)
            tm_rate = tm["output_tokens"] / tm["wall_s"]
            params = sum(w.numel() for n, w in weights.items() if n != "model.embed_tokens.weight" or cfg.tie_word_embeddings)
            mfu = 2 * params * (tm["output_tokens"] + tm["input_tokens"]) / tm["wall_s"] / flops
            mbu = wbytes * tm["steps"] / tm["wall_s"] / bw
            r["tokenmill"] = tm | {"output_tok_s": tm_rate, "compute_fraction": mfu, "weight_bandwidth_fraction": mbu}
            emit(f"| {shape} | {n_requests} req tokenmill | {tm_rate:,.0f} out tok/s | {tm['steps']} steps in "
                 f"{tm['wall_s']:.1f} s | {mfu:.1%} of matmul peak, weights at {mbu:.1%} of copy bw |")
            llm = None
            free(device)  # the KV pool goes before transformers needs the memory
            if model is not None:
                hf = hf_throughput(model, reqs, device, args.hf_batch, args.hf_seconds)
                hf_rate = hf["output_tokens"] / hf["wall_s"]
                r["transformers"] = hf | {"output_tok_s": hf_rate}
                emit(f"| {shape} | transformers generate | {hf_rate:,.0f} out tok/s | {hf['requests']} req in "
                     f"{hf['wall_s']:.1f} s | tokenmill {tm_rate / hf_rate:.1f}x |")
        del llm, model, weights
        free(device)

if __name__ == "__main__":
    main()
