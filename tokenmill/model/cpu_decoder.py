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

static torch::Tensor qlinear(const torch::Tensor& x, const QLin& l) {
  torch::Tensor y = l.int4 ? int4_apply(x, l.q, l.scale, l.min, l.group, l.out) : int8_apply(x, l.q, l.scale, l.group, l.out);
  if (l.bias.defined()) y.add_(l.bias);
  return y;
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

static torch::Tensor rms_norm(const torch::Tensor& h, const torch::Tensor& w, double eps) {
  const int64_t rows = h.size(0), dim = h.size(1);
  torch::Tensor out = torch::empty_like(h);
  const float* hp = h.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* x = hp + r * dim;
      const float inv = 1.f / std::sqrt(sum_squares(x, dim) / static_cast<float>(dim) + static_cast<float>(eps));
      for (int64_t d = 0; d < dim; ++d) op[r * dim + d] = (x[d] * inv) * wp[d];
    }
  });
  return out;
}

// Rotate-half RoPE in place on the first `heads` heads of each row of qkv, as layers.apply_rope:
// x * cos + rotate_half(x) * sin_signed, where sin_signed's first half is negated.
static void rope(torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin, int64_t heads, int64_t dim) {
  const int64_t rows = qkv.size(0), ld = qkv.size(1), half = dim / 2;
  float* p = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> x(dim);
    for (int64_t r = begin; r < end; ++r) {
      const float* c = cp + r * dim;
      const float* s = sp + r * dim;
      for (int64_t j = 0; j < heads; ++j) {
        float* y = p + r * ld + j * dim;
        std::copy(y, y + dim, x.begin());
        for (int64_t d = 0; d < half; ++d) y[d] = x[d] * c[d] + x[d + half] * s[d];
        for (int64_t d = half; d < dim; ++d) y[d] = x[d] * c[d] + x[d - half] * s[d];
      }
    }
  });
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

template <typename K>
static void write_kv_rows(const torch::Tensor& qkv, torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& slots,
                          int64_t heads, int64_t kv_heads, int64_t dim) {
  const int64_t rows = qkv.size(0), ld = qkv.size(1), block = k_cache.size(2);
  const int64_t sb = k_cache.stride(0), sh = k_cache.stride(1), st = k_cache.stride(2);
  const float* p = qkv.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  K* kp = k_cache.data_ptr<K>();
  K* vp = v_cache.data_ptr<K>();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = slot[r] / block, off = slot[r] % block;
    TORCH_CHECK(slot[r] >= 0 && b < k_cache.size(0), "a KV slot lies outside the pool");
    for (int64_t g = 0; g < kv_heads; ++g) {
      const int64_t at = b * sb + g * sh + off * st;
      store_row<K>(p + r * ld + (heads + g) * dim, kp + at, dim);
      store_row<K>(p + r * ld + (heads + kv_heads + g) * dim, vp + at, dim);
    }
  }
}

static void write_kv(const torch::Tensor& qkv, torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& slots,
                     int64_t heads, int64_t kv_heads, int64_t dim) {
  switch (k_cache.scalar_type()) {
    case at::kFloat: return write_kv_rows<float>(qkv, k_cache, v_cache, slots, heads, kv_heads, dim);
    case at::kBFloat16: return write_kv_rows<at::BFloat16>(qkv, k_cache, v_cache, slots, heads, kv_heads, dim);
    case at::kHalf: return write_kv_rows<at::Half>(qkv, k_cache, v_cache, slots, heads, kv_heads, dim);
    case at::kChar: return write_kv_rows<int8_t>(qkv, k_cache, v_cache, slots, heads, kv_heads, dim);
    default: TORCH_CHECK(false, "decoder: a float32, bfloat16, float16 or int8 pool only");
  }
}

// silu(gate) * up for gate_up = [gate | up] per row; silu(g) = g / (1 + exp(-g)), exp by the
// attention kernel's exp_minus (glibc's scalar exp was ~0.7 ms of a decode step and ~140 ms
// of a 200-token prefill).
static torch::Tensor silu_mul(const torch::Tensor& gu) {
  const int64_t rows = gu.size(0), width = gu.size(1) / 2;
  torch::Tensor out = torch::empty({rows, width}, gu.options());
  const float* p = gu.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* g = p + r * 2 * width;
      float* o = op + r * width;
      for (int64_t d = 0; d < width; ++d) o[d] = -g[d];
      exp_minus(o, width, 0.f);
      for (int64_t d = 0; d < width; ++d) o[d] = (g[d] / (1.f + o[d])) * g[width + d];
    }
  });
  return out;
}

static QLin make_qlin(const std::vector<torch::Tensor>& t, size_t& i, const std::vector<int64_t>& ints, size_t& j) {
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
    w.qkv = make_qlin(tensors, i, ints, j);
    w.o = make_qlin(tensors, i, ints, j);
    w.gate_up = make_qlin(tensors, i, ints, j);
    w.down = make_qlin(tensors, i, ints, j);
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
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.is_contiguous() && cos.is_contiguous() && sin.is_contiguous() &&
                  slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.size(0) == h.size(0),
              "decoder: contiguous float32 rows, int64 slots");
  const int64_t rows = h.size(0), heads = dec.heads, kv_heads = dec.kv_heads, dim = dec.head_dim;
  for (size_t i = 0; i < dec.layers.size(); ++i) {
    const DecoderWeights& w = dec.layers[i];
    torch::Tensor k_cache = kv.select(0, 0).select(0, static_cast<int64_t>(i));
    torch::Tensor v_cache = kv.select(0, 1).select(0, static_cast<int64_t>(i));
    torch::Tensor qkv = qlinear(rms_norm(h, w.ln1, dec.eps), w.qkv);
    rope(qkv, cos, sin, heads + kv_heads, dim);
    write_kv(qkv, k_cache, v_cache, slots, heads, kv_heads, dim);
    torch::Tensor q = qkv.narrow(1, 0, heads * dim).view({rows, heads, dim});
    torch::Tensor o = torch::empty({rows, heads, dim}, h.options());
    paged_attention_apply(q, k_cache, v_cache, tables, row_seq, row_ctx, scale, o);
    h.add_(qlinear(o.view({rows, heads * dim}), w.o));
    h.add_(qlinear(silu_mul(qlinear(rms_norm(h, w.ln2, dec.eps), w.gate_up)), w.down));
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
