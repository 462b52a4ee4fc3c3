"""Why GPTQ did not beat round-to-nearest on SmolLM2-135M: per linear of the first layers, the
relative output error ||X (Q - W)^T||^2 / ||X W^T||^2 of RTN and GPTQ on the calibration inputs
(what GPTQ minimises) and on held-out inputs (tests/quantize/data/eval.txt), for calibration
sets of different sizes: the shipped text alone, and the shipped text plus N tokens sampled
from the model itself (quantize/selfgen.py). The float model feeds every layer here (no
sequential quantization), so only the calibration set differs between rows.

    PYTHONPATH=$PWD python benchmarks/gptq_heldout.py --bits 3 --layers 0 3 --generated 4096 16384"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from tokenmill.model.loader import load_model
from tokenmill.quantize.calibration import BlockRunner, calibration_sequences
from tokenmill.quantize.gptq import gptq, hessian
from tokenmill.quantize.grid import QuantGrid
from tokenmill.quantize.pipeline import SHARED_INPUT, float_weights
from tokenmill.quantize.rtn import rtn
from tokenmill.quantize.selfgen import sample_sequences

EVAL = Path(__file__).parent.parent / "tests" / "quantize" / "data" / "eval.txt"


def capture(cfg, work, sequences, layers):
    """Inputs of every captured linear of the given layers, float model, {(layer, name): X}."""
    runner = BlockRunner(cfg, sequences)
    hidden = runner.embed(work)
    got = {}
    for i in range(max(layers) + 1):
        hidden, inputs = runner.run(runner.layer(work, i), hidden, capture=i in layers)
        if i in layers:
            for name in SHARED_INPUT:
                got[(i, name)] = inputs[name]
    return got


def rel_err(x, w, wq):
    return ((x @ (wq - w).t()).pow(2).sum() / (x @ w.t()).pow(2).sum()).item()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--layers", type=int, nargs="+", default=[0, 3])
    p.add_argument("--generated", type=int, nargs="*", default=[4096, 16384])
    p.add_argument("--damp", type=float, nargs="*", default=[0.01, 0.1])
    p.add_argument("--mse", action="store_true", help="GPTQ and RTN with the clip search")
    p.add_argument("--cache", type=Path, default=None, help="JSON of sampled token ids: read if present, else written")
    args = p.parse_args()
    torch.set_num_threads(2)
    lm = load_model("smollm2")
    cfg, tok = lm.config, lm.tokenizer
    work = float_weights(lm.weights)
    grid = QuantGrid(args.bits, min_zero=1)
    shipped = calibration_sequences(tok, None)
    if args.cache is not None and args.cache.is_file():
        generated = json.loads(args.cache.read_text())
    else:
        generated = sample_sequences(cfg, work, tok, max(args.generated)) if args.generated else []
        if args.cache is not None:
            args.cache.write_text(json.dumps(generated))
    per_seq = len(generated[0]) if generated else 1
    sets = {f"shipped {sum(map(len, shipped))}": shipped}
    for n in args.generated:
        seqs = shipped + generated[: -(-n // per_seq)]
        sets[f"shipped+gen {sum(map(len, seqs))}"] = seqs
    held = capture(cfg, work, calibration_sequences(tok, EVAL.read_text(encoding="utf-8")), args.layers)
    print(f"# load {os.getloadavg()}; bits {args.bits} g{args.group_size}; relative output error, calib / held-out")
    for label, seqs in sets.items():
        t0 = time.perf_counter()
        calib = capture(cfg, work, seqs, args.layers)
        for (i, name), x in calib.items():
            prefix = f"model.layers.{i}."
            w = torch.cat([work[f"{prefix}{n}.weight"] for n in SHARED_INPUT[name]])
            xh = held[(i, name)]
            r = rtn(w, grid, args.group_size, mse=args.mse).dequantize()
            line = f"{label:>22} L{i:<2} {name:<18} rtn {rel_err(x, w, r):.4f}/{rel_err(xh, w, r):.4f}"
            h = hessian(x)
            for d in args.damp:
                g = gptq(w, h, grid, args.group_size, damp=d, mse=args.mse).dequantize()
                line += f"  gptq d{d} {rel_err(x, w, g):.4f}/{rel_err(xh, w, g):.4f}"
            print(line, flush=True)
        print(f"# {label}: {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
