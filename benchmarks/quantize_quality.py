"""Perplexity and next-token agreement of quantized SmolLM2-135M against the float model (its
Q4_1 GGUF dequantized, what the quantizers start from), on the held-apart evaluation text of
tests/quantize/data/eval.txt; and how long each quantization took.

    PYTHONPATH=$PWD python benchmarks/quantize_quality.py --out /tmp/qbench [--calib-tokens N]

Rows: float, the GGUF's own Q4_1 (int4 kernel), RTN / GPTQ / AWQ at 3 and 4 bits, group 64, each
written by `tokenmill quantize` and loaded back from its checkpoint. Checkpoints already in --out
are reused (their quantization time is read from their config.json). One JSON line per row goes
to --out/results.jsonl as it is measured, so a long run's finished rows survive an interrupt."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import torch

from tests.model.real import perplexity, sequence_logits
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.loader import load_model
from tokenmill.model.quant import make_linear

EVAL = Path(__file__).parent.parent / "tests" / "quantize" / "data" / "eval.txt"
CONFIGS = [(m, b) for b in (4, 3) for m in ("rtn", "gptq", "awq")]


def logits(source: str, quantization: str):
    lm = load_model(source)
    m = LlamaForCausalLM(lm.config, lm.weights, torch.float32,
                         lambda w, b: make_linear(w, b, torch.float32, quantization, 32), max_positions=2048)
    ids = lm.tokenizer.encode(EVAL.read_text(encoding="utf-8"))
    return ids, sequence_logits(m, ids)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--calib-tokens", type=int, default=None)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--configs", nargs="*", default=None, help="e.g. gptq4 rtn3 (default: all six)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if ln.startswith("Model name")), "?")
    print(f"# CPU: {cpu}; torch threads {torch.get_num_threads()}; load average {os.getloadavg()}")
    results = args.out / "results.jsonl"
    ids, ref = logits("smollm2", "none")
    ppl_f = perplexity(ref, ids)

    def row(name: str, source: str, quantization: str, seconds: float | None):
        _, lg = logits(source, quantization)
        ppl = perplexity(lg, ids)
        agree = (lg.argmax(-1) == ref.argmax(-1)).float().mean().item()
        r = {"model": name, "perplexity": round(ppl, 3), "vs_float": f"{ppl / ppl_f - 1:+.2%}", "agreement": round(agree, 3),
             "quantize_s": seconds, "tokens": len(ids), "load": round(os.getloadavg()[0], 1)}
        print(json.dumps(r), flush=True)
        with results.open("a") as f:
            f.write(json.dumps(r) + "\n")

    row("float (Q4_1 dequantized)", "smollm2", "none", None)
    row("Q4_1 GGUF (int4 kernel)", "smollm2", "auto", None)
    for method, bits in CONFIGS:
        if args.configs is not None and f"{method}{bits}" not in args.configs:
            continue
        out = args.out / f"{method}{bits}g{args.group_size}"
        if not (out / "config.json").is_file():
            cmd = ["python", "-m", "tokenmill", "quantize", "smollm2", "--method", method, "--bits", str(bits),
                   "--group-size", str(args.group_size), "-o", str(out)]
            if args.calib_tokens:
                cmd += ["--calib-tokens", str(args.calib_tokens)]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, stderr=subprocess.DEVNULL)
            if done.returncode:
                print(json.dumps({"model": out.name, "error": done.returncode}), flush=True)
                continue
            print(f"# {out.name}: {time.perf_counter() - t0:.0f} s wall including load and write", flush=True)
        made = json.loads((out / "config.json").read_text())["quantization_config"]["tokenmill"]
        label = f"{method.upper()} {bits}-bit g{args.group_size}"
        if method != "rtn":
            label += f" ({made['calibration_tokens']} calib tokens" + (f", damp {made['damp']})" if method == "gptq" and "damp" in made else ")")
        row(label, str(out), "auto", made["seconds"])
    print(f"# load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
