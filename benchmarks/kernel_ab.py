"""Two checkouts' C++ CPU kernels timed in one process, calls alternating A B B A A B ..., so the
box's drift (it moves between speed states within minutes) hits both sides alike. The kernels are
built from each checkout's sources (the kernel cache is keyed by the source) and run on the same
inputs and weights:

    git worktree add /tmp/before <rev>
    PYTHONPATH=. python benchmarks/kernel_ab.py --a /tmp/before --b . linear [--rows 1,16,64,256]
    PYTHONPATH=. python benchmarks/kernel_ab.py --a /tmp/before --b . attention [--context 260]
    PYTHONPATH=. python benchmarks/kernel_ab.py --a /tmp/before --b . decoder

- linear: the default model's int4/int8 linears (qkernels.py): q|k|v, o, gate|up, down (Q4_1)
  and the Q8_0 LM head, by row count.
- attention: 16 decode rows over 30 layers' pools with scattered blocks (attention/cpu_backend.py),
  DRAM-resident as in a real step (one layer's pool would sit in L3).
- decoder: the C++ decoder forward of the default model (cpu_decoder.py, which compiles the two
  above into it): 16 decode rows at 260 tokens, and 4 prompts of 200 tokens.

Medians per side and A/B (> 1: B is faster). The layouts the kernels take must match between the
checkouts (weights are packed once, by this checkout's code). Run A = B first to see the method's
own spread.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def source_of(root: str, rel: str, name: str = "_SOURCE") -> str:
    spec = importlib.util.spec_from_file_location(f"ab_{abs(hash((root, rel)))}", Path(root) / "tokenmill" / rel)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def paired(fa, fb, n: int, before=None) -> tuple[float, float]:
    """Medians (ms) of n calls each, in the order A B B A A B ... after two of each to warm up;
    `before` (untimed) runs ahead of each call."""
    ta, tb = [], []
    for i in range(n + 2):
        for f, acc in ((fa, ta), (fb, tb)) if i % 2 == 0 else ((fb, tb), (fa, ta)):
            if before is not None:
                before()
            t = time.perf_counter()
            f()
            acc.append(time.perf_counter() - t)
    return statistics.median(ta[2:]) * 1e3, statistics.median(tb[2:]) * 1e3


def show(name: str, a: float, b: float) -> str:
    return f"{name}: A {a:.3f} ms, B {b:.3f} ms, A/B {a / b:.2f}x"


@torch.inference_mode()
def linear(args, build) -> None:
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    from tokenmill.model import qkernels
    from tokenmill.model.gguf_blocks import QuantizedWeight
    from tokenmill.model.quant import make_linear

    sources = [source_of(root, "model/qkernels.py") for root in (args.a, args.b)]
    # An older tree may lack some of today's functions (the GGUF repacking came later).
    mods = [build(qkernels.PREFIX, src, [f for f in qkernels.FUNCTIONS if re.search(rf"\b{f}\(", src)], qkernels.CFLAGS)
            for src in sources]
    shapes = {"q|k|v 960x576 Q4_1": (Q.Q4_1, 960, 576), "gate|up 3072x576 Q4_1": (Q.Q4_1, 3072, 576),
              "down 576x1536 Q4_1": (Q.Q4_1, 576, 1536), "o 576x576 Q4_1": (Q.Q4_1, 576, 576),
              "LM head 49152x576 Q8_0": (Q.Q8_0, 49152, 576)}
    # --cold: 64 MB read between calls, so each call finds its weights in memory, not in the
    # caches (a decode step reads the model's 92 MB: the L3 holds none of a layer's weights when
    # it comes round again, where a loop over one linear keeps all of them there).
    sweep = torch.ones(16 << 20) if args.cold else None
    before = (lambda: sweep.sum()) if args.cold else None
    for name, (qtype, n, k) in shapes.items():
        w = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32)
        lin = make_linear(QuantizedWeight(quantize(w, qtype), qtype, (n, k)), None, torch.float32, "auto", 32)
        out = []
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k)
            a, b = paired(lambda: lin._kernel(mods[0], x), lambda: lin._kernel(mods[1], x),
                          7 if n > 10000 and rows > 16 else 41, before)
            out.append(f"{rows} rows {a * 1e3:.0f} / {b * 1e3:.0f} us ({a / b:.2f}x)")
        print(f"{name}: " + "; ".join(out), flush=True)


@torch.inference_mode()
def attention(args, build) -> None:
    from tokenmill.model.attention.kv_dtype import to_pool

    fns = [build("tokenmill_cpu_attention", source_of(root, "model/attention/cpu_backend.py"), ["paged_attention"],
                 ["-O3", "-fopenmp"]).paged_attention for root in (args.a, args.b)]
    rows, ctx, layers, block = 16, args.context, 30, 16
    per = -(-ctx // block)
    g = torch.Generator().manual_seed(0)
    k = to_pool(torch.randn(layers * rows * per, 3, block, 64, generator=g), torch.bfloat16)
    v = to_pool(torch.randn(layers * rows * per, 3, block, 64, generator=g), torch.bfloat16)
    perm = torch.randperm(layers * rows * per, generator=g)  # blocks scattered, as a pool after some traffic
    tables = [perm[i * rows * per:(i + 1) * rows * per].view(rows, per).contiguous() for i in range(layers)]
    seq, lens = torch.arange(rows), torch.full((rows,), ctx)
    q = torch.randn(rows, 9, 64, generator=g)
    out = torch.empty_like(q)

    def step(fn):
        return lambda: [fn(q, k, v, t, seq, lens, 0.125, out) for t in tables]

    print(show(f"attention, {rows} decode rows x {ctx} keys x {layers} layers", *paired(step(fns[0]), step(fns[1]), 30)))


@torch.inference_mode()
def decoder(args, build) -> None:
    from benchmarks.decode_batch import step_inputs
    from tests.model import real
    from tests.model.test_cpu_decoder import run
    from tokenmill.model import cpu_decoder, qkernels

    model = real.model("auto", cpu_kernel=True)
    decoders = []
    for root in (args.a, args.b):
        src = (source_of(root, "model/qkernels.py") + source_of(root, "model/attention/cpu_backend.py")
               + "\n#include <memory>\n" + source_of(root, "model/cpu_decoder.py", "_LAYER_SOURCE"))
        module = build(cpu_decoder.PREFIX, src, cpu_decoder.FUNCTIONS, qkernels.CFLAGS)
        kernel, cpu_decoder.kernel = cpu_decoder.kernel, lambda module=module: module
        try:
            decoders.append(cpu_decoder.for_model(model))
        finally:
            cpu_decoder.kernel = kernel
    ctx, prompts, length = 260, 4, 200
    work = {}
    for rows in (int(r) for r in args.decode_rows.split(",")):
        kv, decodes, _ = step_inputs(model.config, rows, ctx, prompts, length)
        work[f"decoder forward, {rows} decode rows at {ctx} tokens"] = (kv, decodes, [], 40)
    kv, _, chunks = step_inputs(model.config, 1, ctx, prompts, length)
    work[f"decoder forward, {prompts} x {length}-token prompts"] = (kv, [], chunks, 8)

    def call(dec, kv, decodes, chunks):
        def f():
            model.cpu_decoder = dec
            run(model, kv, decodes, chunks)
        return f

    for name, (kv, decodes, chunks, n) in work.items():
        a, b = call(decoders[0], kv, decodes, chunks), call(decoders[1], kv, decodes, chunks)
        print(show(name, *paired(a, b, n)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="checkout A (before)")
    ap.add_argument("--b", required=True, help="checkout B (after)")
    ap.add_argument("what", choices=["linear", "attention", "decoder"])
    ap.add_argument("--rows", default="1,16,64,256", help="linear: row counts")
    ap.add_argument("--cold", action="store_true", help="linear: weights read from memory (caches swept between calls)")
    ap.add_argument("--context", type=int, default=260, help="attention: keys per decode row")
    ap.add_argument("--decode-rows", default="16", help="decoder: decode row counts (one sequence each)")
    args = ap.parse_args()
    from tokenmill.model.cpp_build import build
    from tokenmill.plan.calibrate import machine_facts

    print(f"CPU: {machine_facts()['cpu']}, {torch.get_num_threads()} threads")
    {"linear": linear, "attention": attention, "decoder": decoder}[args.what](args, build)


if __name__ == "__main__":
    main()
