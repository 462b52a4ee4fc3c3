"""Where a decode step's C++ decoder spends its time, phase by phase, against what its weight
bytes need at the bandwidth this machine gives them.

    PYTHONPATH=. python benchmarks/decoder_phases.py [--rows 1] [--context 260] [--steps 300] [--repeats 3]

Builds the decoder (cpu_decoder.py) once more with a clock around each phase of a layer (the
two norms, the four linears, RoPE + KV write, attention, SwiGLU) and one more function that only
streams the linears' weight bytes: every value, scale and minimum read once, per linear in the
same order and the same two-thread split of the column groups as the kernels, one vector add per
32 bytes and no other work. Per repeat it prints the step, each phase summed over the 30 layers,
the stream-only time of the same bytes and the read probe of benchmarks/cpu_kernels.py. The
linears' share against stream-only says how far they are from what memory gives this access
pattern; their time with the weights in cache (kernel_ab.py linear) says how much is compute.

The instrumentation is spliced into the decoder's source text: if that loop is rewritten, the
splice fails with an AssertionError, not with wrong figures.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

PHASES = ["norm1", "qkv", "rope+kv", "attention", "o", "norm2", "gate|up", "silu*up", "down"]
LINEARS = ("qkv", "o", "gate|up", "down")

_CLOCK = r"""
#include <chrono>
static double g_phase[10];  // per phase: microseconds summed since the last phases() call; [9]: steps
"""

_EXTRA = r"""
std::vector<double> phases() {
  std::vector<double> r(g_phase, g_phase + 10);
  for (auto& x : g_phase) x = 0;
  return r;
}
static inline __m256i sum_bytes(const uint8_t* p, int64_t n, __m256i acc) {
  for (int64_t i = 0; i + 32 <= n; i += 32) acc = _mm256_add_epi64(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
  return acc;
}
static const uint8_t* bytes_of(const torch::Tensor& t) { return static_cast<const uint8_t*>(t.data_ptr()); }
// Every linear's values, scales and minimums read once, in the kernels' split: a thread takes a
// contiguous half of the column groups, as run_into's one-row path does.
int64_t stream_step(int64_t handle) {
  const Decoder& dec = *g_decoders.at(handle);
  int64_t sink[2] = {0, 0};
  for (const auto& layer : dec.layers)
    for (const QLin* l : {&layer.qkv, &layer.o, &layer.gate_up, &layer.down}) {
      const int64_t groups = (l->out + 7) / 8;
      const int64_t qb = l->q.numel() * l->q.element_size() / groups, sb = l->scale.numel() * 2 / groups;
      const int64_t mb = l->min.numel() * 2 / groups;
      // The pointers taken here, not in the threads: read inside the lambda, GCC kept the sum
      // in memory, a store per 32 bytes, and the stream ran at half this speed.
      const uint8_t *q = bytes_of(l->q), *s = bytes_of(l->scale), *mn = mb ? bytes_of(l->min) : nullptr;
      at::parallel_for(0, groups, 1, [&](int64_t b, int64_t e) {
        __m256i acc = sum_bytes(q + b * qb, (e - b) * qb, _mm256_setzero_si256());
        acc = sum_bytes(s + b * sb, (e - b) * sb, acc);
        if (mn) acc = sum_bytes(mn + b * mb, (e - b) * mb, acc);
        sink[b == 0 ? 0 : 1] += _mm256_extract_epi64(acc, 0);
      });
    }
  return sink[0] + sink[1];
}
"""

# The calls of one layer, in order: a clock reading follows each.
_CALLS = ["rms_norm(hp, rows, hidden, w.ln1", "qlinear(normed, rows, w.qkv", "rope_store(", "paged_attention_apply(",
          "qlinear(o.data_ptr<float>(), rows, w.o", "rms_norm(hp, rows, hidden, w.ln2", "qlinear(normed, rows, w.gate_up",
          "silu_mul(", "qlinear(act, rows, w.down"]


def instrumented_source() -> str:
    """cpu_decoder's source with a clock reading after each call of the layer loop, and _EXTRA."""
    from tokenmill.model import cpu_decoder

    src = cpu_decoder.source()
    loop = src[src.index("  for (size_t i = 0; i < dec.layers.size(); ++i) {", src.index("void decoder_forward")):]
    statements, phase = loop.split(";\n"), 0
    for i, statement in enumerate(statements):
        if phase < len(_CALLS) and _CALLS[phase] in statement:
            statements[i] += (f"; {{ auto n = std::chrono::steady_clock::now(); g_phase[{phase}] += "
                              "std::chrono::duration<double, std::micro>(n - t_).count(); t_ = n; }")
            phase += 1
    assert phase == len(_CALLS), "the decoder's layer loop changed: update decoder_phases.py"
    timed = ";\n".join(statements)
    timed = timed.replace("    const DecoderWeights& w = dec.layers[i];",
                          "    const DecoderWeights& w = dec.layers[i];\n    auto t_ = std::chrono::steady_clock::now();", 1)
    timed = timed.replace("\n}\n", "\n  g_phase[9] += 1;\n}\n", 1)  # the function's end: one step more
    return src.replace(loop, timed).replace("struct DecoderWeights {", _CLOCK + "struct DecoderWeights {", 1) + _EXTRA


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1, help="decode rows, one sequence each")
    ap.add_argument("--context", type=int, default=260, help="tokens in each decode row's context")
    ap.add_argument("--steps", type=int, default=300, help="steps per timing")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from benchmarks.cpu_kernels import bandwidth_gbs
    from benchmarks.decode_batch import step_inputs
    from tests.model import real
    from tests.model.test_cpu_decoder import run
    from tokenmill.model import cpu_decoder, qkernels, weight_arena
    from tokenmill.model.cpp_build import build
    from tokenmill.plan.calibrate import machine_facts

    module = build("tokenmill_decoder_phases", instrumented_source(),
                   cpu_decoder.FUNCTIONS + ["phases", "stream_step"], qkernels.CFLAGS)
    model = real.model("auto", cpu_kernel=True)
    kernel, cpu_decoder.kernel = cpu_decoder.kernel, lambda: module
    try:
        model.cpu_decoder = cpu_decoder.for_model(model)
    finally:
        cpu_decoder.kernel = kernel
    handle = model.cpu_decoder.handle
    nbytes = sum(t.numel() * t.element_size() for layer in model.layers
                 for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up, layer.mlp.down)
                 for t in cpu_decoder._linear_parts(lin)[0] if t.dtype in (torch.uint8, torch.int8, torch.float16))
    huge = weight_arena.huge_page_bytes(model.layers[0].mlp.gate_up.packed)  # the arena holding the weights
    kv, decodes, _ = step_inputs(model.config, args.rows, args.context, 1, 1)
    print(f"CPU: {machine_facts()['cpu']}, {torch.get_num_threads()} threads; {args.rows} decode row(s) at "
          f"{args.context} tokens; the linears' weights {nbytes / 1e6:.1f} MB a step, their arena "
          f"{'unknown' if huge is None else f'{huge / 2**20:.0f} MiB'} on huge pages")
    with torch.inference_mode():
        run(model, kv, decodes, [])  # first-call allocations
        for _ in range(args.repeats):
            module.phases()
            t = time.perf_counter()
            for _ in range(args.steps):
                run(model, kv, decodes, [])
            step = (time.perf_counter() - t) / args.steps * 1e3
            ph = module.phases()
            per = {name: ph[i] / ph[9] / 1e3 for i, name in enumerate(PHASES)}
            t = time.perf_counter()
            for _ in range(args.steps):
                module.stream_step(handle)
            stream = (time.perf_counter() - t) / args.steps * 1e3
            probe = statistics.median(bandwidth_gbs() for _ in range(3))
            lin = sum(per[k] for k in LINEARS)
            print(f"step {step:.2f} ms (model forward); " + ", ".join(f"{k} {v:.3f}" for k, v in per.items())
                  + f" ms | linears {lin:.2f} ms = {nbytes / lin / 1e6:.1f} GB/s; stream-only {stream:.2f} ms = "
                  f"{nbytes / stream / 1e6:.1f} GB/s; probe {probe:.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
