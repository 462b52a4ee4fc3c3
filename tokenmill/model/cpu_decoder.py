"""Every decoder layer of a CPU model in one C++ call per step, for the models whose linears all
run tokenmill's quantized kernels (qkernels.py) over the C++ attention (attention/cpu_backend.py):
the default GGUF model and every int4/int8 one.

Why: at one row a layer's work is about 20 small torch ops around its four linears (two
norms, RoPE's five, the KV write's indexing, the residual adds, SiLU and a multiply), each a
Python call and a dispatch of a few microseconds on a 2-core box, 30 layers a step. Here a step
is one call: the norms, RoPE, the KV write, SiLU and the residual adds are loops over the rows,
and the linears and attention are the same C++ functions the torch path calls, without their
Python wrappers. The weights are handed over once, when the model is built (`register_model`),
so a step passes only its activations and metadata.

Batch invariance is kept: every row's arithmetic is one fixed sequence whatever the rows
beside it (the norms reduce in 8 lanes then a fixed order, RoPE and SiLU are per element, the
linears and attention are batch-invariant already). The torch path stays the reference and the
fallback (float or fp8 weights, Qwen3's q/k norms, another device, a failed build); the two
agree within float32 rounding (tests/model/test_cpu_decoder.py), not bit for bit, which is why
a model runs every row of every step on one of them, never a mix.
"""

from __future__ import annotations

import functools
import logging

import torch

from tokenmill.model import qkernels
from tokenmill.model.attention import cpu_backend
from tokenmill.model.cpp_build import build
from tokenmill.model.quant import Int4Linear, Int8Linear

log = logging.getLogger("tokenmill")

_LAYER_SOURCE = r"""
// One registered model: its layers' weights, held here so a step passes none of them.
struct QLin {
  torch::Tensor q, scale, min, bias;  // bias undefined where the linear has none
  int64_t group = 0, out = 0;
  bool int4 = true;
  Int4W w4{};  // the weights as the kernels read them (pointers into q, scale, min), checked once
  Int8W w8{};
};
struct DecoderWeights {
  torch::Tensor ln1, ln2;
  QLin qkv, o, gate_up, down;
};
struct Decoder {
  std::vector<DecoderWeights> layers;
  int64_t heads = 0, kv_heads = 0, head_dim = 0;
  double eps = 0;
};
static std::vector<std::unique_ptr<Decoder>> g_decoders;  // a handle is an index; freed slots stay null

static void product(const float* x, int64_t rows, const QLin& l, float* y, bool add) {
  if (l.int4) run_into(x, rows, l.out, l.w4, y, add);
  else run_into(x, rows, l.out, l.w8, y, add);
}

// y [rows, out] = x @ W.T + bias, or with add, y += that: y + (x @ W.T + bias), the bits of
// y.add_(linear(x)). Without a bias the sum goes straight into y (no buffer, no pass over it).
static void qlinear(const float* x, int64_t rows, const QLin& l, float* y, bool add) {
  if (!l.bias.defined()) return product(x, rows, l, y, add);
  std::vector<float> t(add ? rows * l.out : 0);
  float* p = add ? t.data() : y;
  product(x, rows, l, p, false);
  const float* b = l.bias.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t n = 0; n < l.out; ++n) {
      p[r * l.out + n] += b[n];
      if (add) y[r * l.out + n] += p[r * l.out + n];
    }
}

// --- 8-lane float vector: AVX2 or a plain array with the same lane semantics ---
#if defined(__AVX2__) && defined(__FMA__)
typedef __m256 V8;
static inline V8 v_zero() { return _mm256_setzero_ps(); }
static inline V8 v_load(const float* p) { return _mm256_loadu_ps(p); }
static inline V8 v_fma(V8 a, V8 b, V8 c) { return _mm256_fmadd_ps(a, b, c); }
static inline float v_sum(V8 v) {  // fixed order: ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  __m128 s = _mm_add_ps(lo, hi);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#else
struct V8 { float l[8]; };
static inline V8 v_zero() { V8 v; for (int i = 0; i < 8; ++i) v.l[i] = 0.f; return v; }
static inline V8 v_load(const float* p) { V8 v; for (int i = 0; i < 8; ++i) v.l[i] = p[i]; return v; }
static inline V8 v_fma(V8 a, V8 b, V8 c) { for (int i = 0; i < 8; ++i) c.l[i] = std::fma(a.l[i], b.l[i], c.l[i]); return c; }
static inline float v_sum(V8 v) {  // the AVX2 order above
  float a = v.l[0] + v.l[4], b = v.l[1] + v.l[5], c = v.l[2] + v.l[6], d = v.l[3] + v.l[7];
  return (a + c) + (b + d);
}
#endif

// Sum of squares of a row: 8 lanes in k order, summed in v_sum's fixed order, then the tail.
static inline float sum_squares(const float* x, int64_t n) {
  V8 acc = v_zero();
  const int64_t n8 = n - n % 8;
  for (int64_t k = 0; k < n8; k += 8) {
    V8 xv = v_load(x + k);
    acc = v_fma(xv, xv, acc);
  }
  float s = v_sum(acc);
  for (int64_t k = n8; k < n; ++k) s = std::fma(x[k], x[k], s);
  return s;
}

// Rows are independent everywhere below: a parallel split over rows changes no row's arithmetic.
// 4 rows a task, so a 16-row decode step's norms, RoPE and SwiGLU use both threads (1.03-1.05x
// on the step with the activation rounding's split below, paired in one process; at 16 they ran
// on one thread while the other spun).
static constexpr int64_t kRowGrain = 4;

static void rms_norm(const float* hp, int64_t rows, int64_t dim, const torch::Tensor& w, double eps, float* op) {
  const float* wp = w.data_ptr<float>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* x = hp + r * dim;
      const float inv = 1.f / std::sqrt(sum_squares(x, dim) / static_cast<float>(dim) + static_cast<float>(eps));
      for (int64_t d = 0; d < dim; ++d) op[r * dim + d] = (x[d] * inv) * wp[d];
    }
  });
}

// Rotate-half RoPE in place on the first `heads` heads of a row, as layers.apply_rope:
// x * cos + rotate_half(x) * sin_signed, where sin_signed's first half is negated.
static inline void rope_row(float* row, const float* c, const float* s, int64_t heads, int64_t dim, float* x) {
  const int64_t half = dim / 2;
  for (int64_t j = 0; j < heads; ++j) {
    float* y = row + j * dim;
    std::copy(y, y + dim, x);
    for (int64_t d = 0; d < half; ++d) y[d] = x[d] * c[d] + x[d + half] * s[d];
    for (int64_t d = half; d < dim; ++d) y[d] = x[d] * c[d] + x[d - half] * s[d];
  }
}

// One K or V row into the pool, as kv_dtype.to_pool rounds it: float types by conversion
// (round to nearest even), int8 as quantize_int8 (amax / 127 scale, kept after the values).
template <typename K>
static inline void store_row(const float* x, K* dst, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<K>(x[d]);
}
template <>
inline void store_row<int8_t>(const float* x, int8_t* dst, int64_t dim) {
  float amax = 0.f;
  for (int64_t d = 0; d < dim; ++d) amax = std::max(amax, std::fabs(x[d]));
  const float scale = amax / 127.f;
  const float div = std::max(scale, std::numeric_limits<float>::min());
  for (int64_t d = 0; d < dim; ++d)
    dst[d] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(x[d] / div))));
  std::memcpy(dst + dim, &scale, sizeof scale);
}

// Per row of qkv [rows, ld]: RoPE on its q and k heads, then its K and V rows into the pool at
// its slot. One pass over the rows, split between the threads: the rows' slots are distinct.
template <typename K>
static void rope_store_rows(float* p, int64_t rows, int64_t ld, const float* cp, const float* sp, torch::Tensor& k_cache,
                            torch::Tensor& v_cache, const int64_t* slot, int64_t heads, int64_t kv_heads, int64_t dim) {
  const int64_t block = k_cache.size(2), sb = k_cache.stride(0), sh = k_cache.stride(1), st = k_cache.stride(2);
  K* kp = k_cache.data_ptr<K>();
  K* vp = v_cache.data_ptr<K>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> x(dim);
    for (int64_t r = begin; r < end; ++r) {
      float* row = p + r * ld;
      rope_row(row, cp + r * dim, sp + r * dim, heads + kv_heads, dim, x.data());
      const int64_t b = slot[r] / block, off = slot[r] % block;
      for (int64_t g = 0; g < kv_heads; ++g) {
        const int64_t at = b * sb + g * sh + off * st;
        store_row<K>(row + (heads + g) * dim, kp + at, dim);
        store_row<K>(row + (heads + kv_heads + g) * dim, vp + at, dim);
      }
    }
  });
}

static void rope_store(float* p, int64_t rows, int64_t ld, const float* cp, const float* sp, torch::Tensor& k_cache,
                       torch::Tensor& v_cache, const int64_t* slot, int64_t heads, int64_t kv_heads, int64_t dim) {
  switch (k_cache.scalar_type()) {
    case at::kFloat: return rope_store_rows<float>(p, rows, ld, cp, sp, k_cache, v_cache, slot, heads, kv_heads, dim);
    case at::kBFloat16: return rope_store_rows<at::BFloat16>(p, rows, ld, cp, sp, k_cache, v_cache, slot, heads, kv_heads, dim);
    case at::kHalf: return rope_store_rows<at::Half>(p, rows, ld, cp, sp, k_cache, v_cache, slot, heads, kv_heads, dim);
    case at::kChar: return rope_store_rows<int8_t>(p, rows, ld, cp, sp, k_cache, v_cache, slot, heads, kv_heads, dim);
    default: TORCH_CHECK(false, "decoder: a float32, bfloat16, float16 or int8 pool only");
  }
}

// silu(gate) * up for gate_up = [gate | up] per row; silu(g) = g / (1 + exp(-g)), exp by the
// attention kernel's exp_minus (glibc's scalar exp was ~0.7 ms of a decode step and ~140 ms
// of a 200-token prefill).
static void silu_mul(const float* p, int64_t rows, int64_t width, float* op) {
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* g = p + r * 2 * width;
      float* o = op + r * width;
      for (int64_t d = 0; d < width; ++d) o[d] = -g[d];
      exp_minus(o, width, 0.f);
      for (int64_t d = 0; d < width; ++d) o[d] = (g[d] / (1.f + o[d])) * g[width + d];
    }
  });
}

static QLin make_qlin(const std::vector<torch::Tensor>& t, size_t& i, const std::vector<int64_t>& ints, size_t& j,
                      int64_t in_features) {
  QLin l;
  l.q = t[i++];
  l.scale = t[i++];
  l.min = t[i++];
  l.bias = t[i++];
  if (l.bias.numel() == 0) l.bias = torch::Tensor();
  l.group = ints[j++];
  l.int4 = ints[j++] != 0;
  l.out = ints[j++];
  TORCH_CHECK(l.q.scalar_type() == (l.int4 ? at::kByte : at::kChar), "decoder: a linear's values have the wrong dtype");
  TORCH_CHECK(!l.bias.defined() || (l.bias.scalar_type() == at::kFloat && l.bias.is_contiguous() && l.bias.numel() == l.out),
              "decoder: a bias must be contiguous float32 [out_features]");
  if (l.int4) l.w4 = int4_weights(l.q, l.scale, l.min, l.group, l.out);
  else l.w8 = int8_weights(l.q, l.scale, l.group, l.out, in_features);
  TORCH_CHECK((l.int4 ? l.w4.K : l.w8.K) == in_features, "decoder: a linear's in_features do not match the layer");
  return l;
}

// tensors: per layer ln1, ln2, then per linear (qkv, o, gate_up, down) values, scale, min, bias
// (empty tensors where absent); ints: heads, kv_heads, head_dim, then per layer and linear its
// group size, 1 for int4 / 0 for int8, and out_features. Returns the handle.
int64_t register_model(std::vector<torch::Tensor> tensors, std::vector<int64_t> ints, double eps) {
  auto dec = std::make_unique<Decoder>();
  size_t j = 0;
  dec->heads = ints[j++];
  dec->kv_heads = ints[j++];
  dec->head_dim = ints[j++];
  dec->eps = eps;
  TORCH_CHECK(tensors.size() % 18 == 0 && ints.size() == 3 + tensors.size() / 18 * 12, "decoder: malformed weights");
  for (size_t i = 0; i < tensors.size();) {
    DecoderWeights w;
    w.ln1 = tensors[i++];
    w.ln2 = tensors[i++];
    const int64_t hidden = w.ln1.numel();
    w.qkv = make_qlin(tensors, i, ints, j, hidden);
    w.o = make_qlin(tensors, i, ints, j, dec->heads * dec->head_dim);
    w.gate_up = make_qlin(tensors, i, ints, j, hidden);
    w.down = make_qlin(tensors, i, ints, j, w.gate_up.out / 2);
    TORCH_CHECK(w.qkv.out == (dec->heads + 2 * dec->kv_heads) * dec->head_dim && w.o.out == hidden && w.down.out == hidden &&
                    w.ln2.numel() == hidden && (dec->layers.empty() || (hidden == dec->layers[0].ln1.numel() &&
                                                                        w.gate_up.out == dec->layers[0].gate_up.out)),
                "decoder: the layers' shapes do not fit together");
    dec->layers.push_back(std::move(w));
  }
  g_decoders.push_back(std::move(dec));
  return static_cast<int64_t>(g_decoders.size()) - 1;
}

void release_model(int64_t handle) {
  if (handle >= 0 && handle < static_cast<int64_t>(g_decoders.size())) g_decoders[handle].reset();
}

// h [T, D] float32, updated in place through every layer. kv [2, layers, blocks, kv_heads,
// block, width]; slots [T]; tables, row_seq, row_ctx as paged_attention takes them.
void decoder_forward(int64_t handle, torch::Tensor h, torch::Tensor cos, torch::Tensor sin, torch::Tensor kv,
                     torch::Tensor slots, torch::Tensor tables, torch::Tensor row_seq, torch::Tensor row_ctx, double scale) {
  TORCH_CHECK(handle >= 0 && handle < static_cast<int64_t>(g_decoders.size()) && g_decoders[handle], "decoder: no such model");
  const Decoder& dec = *g_decoders[handle];  // taken with the GIL held: register_model may grow the vector
  pybind11::gil_scoped_release no_gil;  // as the kernels: the server's HTTP loop runs meanwhile
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.is_contiguous() && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
                  cos.is_contiguous() && sin.is_contiguous() && cos.numel() == h.size(0) * dec.head_dim &&
                  sin.sizes() == cos.sizes() &&
                  slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.size(0) == h.size(0),
              "decoder: contiguous float32 rows, cos and sin [rows, head_dim], int64 slots");
  TORCH_CHECK(kv.dim() == 6 && kv.size(0) == 2 && kv.size(1) == static_cast<int64_t>(dec.layers.size()),
              "decoder: kv must be [2, layers, blocks, kv_heads, block, width]");
  const int64_t rows = h.size(0), hidden = h.size(1), heads = dec.heads, kv_heads = dec.kv_heads, dim = dec.head_dim;
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(slot[r] >= 0 && slot[r] / kv.size(4) < kv.size(2), "a KV slot lies outside the pool");
  // The step's buffers, reused by every layer (the layers' shapes are checked equal at registration).
  const DecoderWeights& w0 = dec.layers.front();
  TORCH_CHECK(hidden == w0.ln1.numel(), "decoder: rows of the wrong width");
  const int64_t inter = w0.gate_up.out / 2;
  // torch's allocator: 64-byte aligned and not zeroed, where a std::vector was neither
  torch::Tensor buffers = torch::empty({3 * rows * inter + rows * hidden}, h.options());
  float *normed = buffers.data_ptr<float>(), *gu = normed + rows * hidden, *act = gu + 2 * rows * inter;
  torch::Tensor qkv = torch::empty({rows, w0.qkv.out}, h.options());
  torch::Tensor q = qkv.narrow(1, 0, heads * dim).view({rows, heads, dim});
  torch::Tensor o = torch::empty({rows, heads, dim}, h.options());
  float* hp = h.data_ptr<float>();
  for (size_t i = 0; i < dec.layers.size(); ++i) {
    const DecoderWeights& w = dec.layers[i];
    torch::Tensor k_cache = kv.select(0, 0).select(0, static_cast<int64_t>(i));
    torch::Tensor v_cache = kv.select(0, 1).select(0, static_cast<int64_t>(i));
    rms_norm(hp, rows, hidden, w.ln1, dec.eps, normed);
    qlinear(normed, rows, w.qkv, qkv.data_ptr<float>(), false);
    rope_store(qkv.data_ptr<float>(), rows, qkv.size(1), cos.data_ptr<float>(), sin.data_ptr<float>(), k_cache, v_cache, slot,
               heads, kv_heads, dim);
    paged_attention_apply(q, k_cache, v_cache, tables, row_seq, row_ctx, scale, o);
    qlinear(o.data_ptr<float>(), rows, w.o, hp, true);
    rms_norm(hp, rows, hidden, w.ln2, dec.eps, normed);
    qlinear(normed, rows, w.gate_up, gu, false);
    silu_mul(gu, rows, inter, act);
    qlinear(act, rows, w.down, hp, true);
  }
}
"""

PREFIX, FUNCTIONS = "tokenmill_cpu_decoder", ["register_model", "release_model", "decoder_forward"]


def source() -> str:
    """The kernels' sources and the layer code as one translation unit: the decoder calls the
    linears and attention directly."""
    return qkernels._SOURCE + cpu_backend._SOURCE + "\n#include <memory>\n" + _LAYER_SOURCE


@functools.cache
def kernel():
    """The compiled module, or None where it cannot be built (the torch path runs)."""
    try:
        return build(PREFIX, source(), FUNCTIONS, qkernels.CFLAGS)
    except Exception as e:
        log.warning("CPU decoder kernel unavailable, running layers op by op: %s", str(e).splitlines()[0] if str(e) else e)
        return None


def _linear_parts(lin) -> tuple[list[torch.Tensor], list[int]] | None:
    """(values, scale, min, bias) and (group, int4?, out_features) of one of the quantized kernels' linears
    with float32 output, else None (float, fp8 or mixed GGUF types: the torch path)."""
    if getattr(lin, "out_dtype", None) != torch.float32 or not getattr(lin, "kernel_fits", False):
        return None
    bias = torch.empty(0) if lin.bias is None else lin.bias.float().contiguous()
    if type(lin) is Int4Linear:
        return [lin.packed, lin.scale, lin.minimum, bias], [lin.group_size, 1, lin.out_features]
    if type(lin) is Int8Linear:
        return [lin.qweight, lin.scales, torch.empty(0, dtype=torch.float16), bias], [lin.group_size, 0, lin.out_features]
    return None


class CpuDecoder:
    """A model's layers registered with the C++ decoder; `forward` runs all of them."""

    def __init__(self, module, handle: int, scale: float):
        self.module, self.handle, self.scale = module, handle, scale

    def __del__(self):
        try:
            self.module.release_model(self.handle)
        except Exception:  # at interpreter exit the module may be gone already: nothing to free
            pass

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv_caches: torch.Tensor, step) -> torch.Tensor:
        """h [T, D] float32 through every layer, in place; `step` is CpuAttention.prepare's."""
        cos, sin = rope
        slots = step.meta.slot_mapping.long().contiguous()
        self.module.decoder_forward(self.handle, h, cos, sin, kv_caches, slots, *step.rows, self.scale)
        return h


def for_model(model) -> CpuDecoder | None:
    """The C++ decoder for a LlamaForCausalLM on the CPU attention kernel whose linears all run
    the quantized kernels in float32, else None."""
    cfg = model.config
    if model.dtype != torch.float32 or cfg.qk_norm or not isinstance(model.attention, cpu_backend.CpuAttention):
        return None
    tensors: list[torch.Tensor] = []
    ints = [cfg.num_heads, cfg.num_kv_heads, cfg.head_dim]
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        tensors += [layer.input_layernorm.weight.data.contiguous(), layer.post_attention_layernorm.weight.data.contiguous()]
        for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up, mlp.down):
            parts = _linear_parts(lin)
            if parts is None:
                return None
            tensors += parts[0]
            ints += parts[1]
    module = kernel()
    if module is None:
        return None
    handle = module.register_model(tensors, ints, cfg.rms_norm_eps)
    return CpuDecoder(module, handle, model.layers[0].self_attn.scale)
