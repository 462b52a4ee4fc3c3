"""`tokenmill quantize MODEL --method rtn|gptq|awq --bits B --group-size G -o DIR`."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from tokenmill.quantize.spec import FORMATS, METHODS, QuantizeSpec

log = logging.getLogger("tokenmill.quantize")


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="'smollm2', a .gguf file (dequantized first) or an HF checkpoint directory")
    p.add_argument("-o", "--output", required=True, type=Path, help="the checkpoint directory to write")
    p.add_argument("--method", choices=METHODS, default="gptq")
    p.add_argument("--bits", type=int, choices=(2, 3, 4, 8), default=4)
    p.add_argument("--group-size", type=int, default=128, help="input columns sharing one scale and zero")
    p.add_argument("--sym", action="store_true", help="symmetric grid (no zero points)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing activation")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="checkpoint format (default: awq for 4-bit AWQ, else gptq, i.e. GPTQ v1 zero points)")
    p.add_argument("--calib", type=Path, default=None, help="calibration text file (default: the shipped one)")
    p.add_argument("--calib-tokens", type=int, default=None, help="use at most this many calibration tokens")
    p.add_argument("--calib-generate", type=int, default=None, metavar="N",
                   help="add N tokens sampled from the model itself to the calibration text "
                        "(default 4096 for gptq, which overfits the ~1,500 shipped tokens; 0 for awq)")
    p.add_argument("--mse", action="store_true",
                   help="rtn/gptq: shrink each group's range to the least rounding error (GPTQ weighs it by diag(H))")
    p.add_argument("--seq-len", type=int, default=512, help="calibration sequence length")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads while quantizing (default 1: its many small ops stall on more when the CPU is shared)")
    p.add_argument("--damp", type=float, default=0.1,
                   help="GPTQ dampening, a fraction of the mean Hessian diagonal (0.1: small calibration sets overfit at 0.01)")


def spec_from_args(args: argparse.Namespace) -> QuantizeSpec:
    return QuantizeSpec(method=args.method, bits=args.bits, group_size=args.group_size, sym=args.sym,
                        act_order=args.act_order, format=args.format, damp=args.damp, seq_len=args.seq_len,
                        max_tokens=args.calib_tokens, threads=args.threads,
                        calib_generate=args.calib_generate, mse=args.mse)


def run_quantize(args: argparse.Namespace) -> int:
    from tokenmill.model.loader import load_model
    from tokenmill.quantize.checkpoint import write_checkpoint
    from tokenmill.quantize.pipeline import quantize_model

    spec = spec_from_args(args)  # bad flags fail before the model loads
    if args.calib is not None and not args.calib.is_file():
        raise ValueError(f"--calib {args.calib}: no such file")
    loaded = load_model(args.model)
    result = quantize_model(loaded.config, loaded.weights, loaded.tokenizer, spec, args.calib)
    source = Path(loaded.source)
    extra = {"method": spec.method, "damp": spec.damp, "mse": spec.mse, "calib_generate": spec.generated_tokens, "source": args.model, "calibration_tokens": result.calibration_tokens,
             "seconds": round(result.seconds, 1), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_checkpoint(args.output, loaded.config, loaded.tokenizer, result.weights, spec,
                     source if source.is_dir() else None, extra)
    log.info("%s %d-bit g%d (%s format): %d calibration tokens, %.1f s -> %s", spec.method, spec.bits,
             spec.group_size, spec.checkpoint_format, result.calibration_tokens, result.seconds, args.output)
    return 0
