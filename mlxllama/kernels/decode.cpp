// The fused decode block (decode.h). Per-token work of a small model is a few microseconds per
// operation; run as ~25 MLX operations per layer, dispatching them cost as much as the matmuls.
// Here the block is one operation: the matmuls go through the quantized kernel (qmm.cpp) and its
// thread pool, the rest are short loops.

#include "decode.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <optional>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "qmm.h"
#include "qmm_internal.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace mlxllama {

std::atomic<int64_t> cache_copies{0};

int64_t decode_cache_copies() {
  return cache_copies.load();
}

namespace {

// Loops the compiler vectorises, built for each instruction set and picked at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MLXLLAMA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MLXLLAMA_CLONES
#endif

// A float sum in a fixed order cannot be vectorised (without -ffast-math), so the sums below keep 16
// independent partial sums, which the compiler turns into vector lanes.
constexpr int kLanes = 16;

[[gnu::always_inline]] inline float dot(const float* a, const float* b, int n) {
  float acc[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  }
  for (; i < n; ++i) acc[0] += a[i] * b[i];
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

MLXLLAMA_CLONES void rms_norm(const float* x, const float* w, float eps, float* out, int n) {
  const float r = 1.f / std::sqrt(dot(x, x, n) / n + eps);
  for (int i = 0; i < n; ++i) out[i] = x[i] * r * w[i];
}

// x (Dh) rotated: x * cos + roll_half(x) * sin
void rope(float* x, const float* cos, const float* sin, int dh, float* tmp) {
  const int half = dh / 2;
  for (int i = 0; i < half; ++i) tmp[i] = x[i] * cos[i] + x[i + half] * sin[i];
  for (int i = half; i < dh; ++i) tmp[i] = x[i] * cos[i] + x[i - half] * sin[i];
  std::memcpy(x, tmp, sizeof(float) * dh);
}

// One query head over positions 0 .. n - 1 of its KV head: softmax(scale * q K^T) V.
// scores: n floats of scratch.
void softmax_inplace(float* scores, int n) {
  float mx = -INFINITY;
  for (int j = 0; j < n; ++j) mx = std::max(mx, scores[j]);
  float sum = 0.f;
  for (int j = 0; j < n; ++j) {
    scores[j] = std::exp(scores[j] - mx);
    sum += scores[j];
  }
  const float inv = 1.f / sum;
  for (int j = 0; j < n; ++j) scores[j] *= inv;
}

void attend_generic(const float* q, const float* k, const float* v, int n, int dh, float scale, float* scores,
                    float* out) {
  for (int j = 0; j < n; ++j) scores[j] = scale * dot(q, k + static_cast<size_t>(j) * dh, dh);
  softmax_inplace(scores, n);
  std::fill(out, out + dh, 0.f);
  for (int j = 0; j < n; ++j) {
    const float p = scores[j];
    const float* vj = v + static_cast<size_t>(j) * dh;
    for (int i = 0; i < dh; ++i) out[i] += p * vj[i];
  }
}

#if defined(__x86_64__)
// Head dims up to 128 in multiples of 16: the query (and the output) sit in at most 8 registers.
constexpr int kMaxVecs = 8;

__attribute__((target("avx512f"))) void attend_avx512(const float* q, const float* k, const float* v, int n, int dh,
                                                      float scale, float* scores, float* out) {
  const int vecs = dh / 16;
  __m512 qv[kMaxVecs], acc[kMaxVecs];
  for (int c = 0; c < vecs; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
  for (int j = 0; j < n; ++j) {
    const float* kj = k + static_cast<size_t>(j) * dh;
    __m512 a = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kj));
    for (int c = 1; c < vecs; ++c) a = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kj + 16 * c), a);
    scores[j] = scale * _mm512_reduce_add_ps(a);
  }
  softmax_inplace(scores, n);
  for (int c = 0; c < vecs; ++c) acc[c] = _mm512_setzero_ps();
  for (int j = 0; j < n; ++j) {
    const float* vj = v + static_cast<size_t>(j) * dh;
    const __m512 p = _mm512_set1_ps(scores[j]);
    for (int c = 0; c < vecs; ++c) acc[c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vj + 16 * c), acc[c]);
  }
  for (int c = 0; c < vecs; ++c) _mm512_storeu_ps(out + 16 * c, acc[c]);
}

#endif

void attend(const float* q, const float* k, const float* v, int n, int dh, float scale, float* scores, float* out) {
#if defined(__x86_64__)
  static const bool avx512 = std::strcmp(qmm_isa(), "avx512") == 0; // the matmul's choice (and its cap)
  if (avx512 && dh % 16 == 0 && dh <= 16 * kMaxVecs) return attend_avx512(q, k, v, n, dh, scale, scores, out);
#endif
  attend_generic(q, k, v, n, dh, scale, scores, out);
}

struct Proj {
  const uint32_t* w;
  const void* scales;
  const void* biases;
  ScaleType st;
  int n, k, group_size, bits;
};

Proj proj(const std::vector<mx::array>& in, int at, int group_size, int bits) {
  const auto& w = in[at];
  return {w.data<uint32_t>(), in[at + 1].data<void>(), in[at + 2].data<void>(), scale_type(in[at + 1].dtype()),
          static_cast<int>(w.shape(0)), static_cast<int>(w.shape(1)) * 32 / bits, group_size, bits};
}

void matvec(const Proj& p, const float* x, float* out) {
  detail::qmm_rows(x, 1, p.k, p.w, p.scales, p.biases, p.st, out, p.n, p.group_size, p.bits);
}

// q, k, v of one block from its input x (D floats): rms_norm, the stacked projection, rotary on q
// and k. in[at .. at + 5]: input_norm, qkv w/s/b, cos, sin (Dh each).
void qkv_rows(const float* x, int D, const std::vector<mx::array>& in, int at, const BlockShape& s, float* y) {
  const int Dh = s.head_dim;
  thread_local std::vector<float> h, tmp;
  h.resize(D), tmp.resize(Dh);
  rms_norm(x, in[at].data<float>(), s.norm_eps, h.data(), D);
  const Proj qkv = proj(in, at + 1, s.group_size[0], s.bits[0]);
  matvec(qkv, h.data(), y); // [q (H Dh) | k (Hkv Dh) | v (Hkv Dh)]
  const float* cos = in[at + 4].data<float>();
  const float* sin = in[at + 5].data<float>();
  for (int head = 0; head < s.n_heads + s.n_kv_heads; ++head) rope(y + head * Dh, cos, sin, Dh, tmp.data());
}

// Per layer: input_norm, qkv w/s/b, o w/s/b, post_norm, gate_up w/s/b, down w/s/b (decode.h).
enum Weight { NORM_IN, QKV, O = QKV + 3, NORM_POST = O + 3, GATE_UP, DOWN = GATE_UP + 3, WEIGHTS = DOWN + 3 };

bool same(const BlockShape& a, const BlockShape& b) {
  return a.n_heads == b.n_heads && a.n_kv_heads == b.n_kv_heads && a.head_dim == b.head_dim &&
         a.norm_eps == b.norm_eps && a.scale == b.scale && a.group_size == b.group_size && a.bits == b.bits;
}

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("[decode_layers] " + what);
}

void require_contiguous(const std::vector<mx::array>& inputs, int from) {
  for (size_t at = from; at < inputs.size(); ++at) {
    if (!inputs[at].flags().row_contiguous) {
      throw std::invalid_argument("[decode_layers] input " + std::to_string(at) + " must be row-contiguous");
    }
  }
}

std::vector<mx::array> weak(const std::vector<mx::array>& arrays) {
  std::vector<mx::array> out;
  for (const auto& a : arrays) out.push_back(mx::array::unsafe_weak_copy(a));
  return out;
}

// The first n floats of x along its last axis (x may be any view)
void gather(const mx::array& x, int n, float* dst) {
  const float* src = x.data<float>();
  const int64_t stride = x.strides().back();
  for (int i = 0; i < n; ++i) dst[i] = src[i * stride];
}

void check_layer(const std::vector<mx::array>& w, const BlockShape& s, int D) {
  require(w.size() == WEIGHTS, "each layer has " + std::to_string(WEIGHTS) + " weights");
  const int H = s.n_heads, Hkv = s.n_kv_heads, Dh = s.head_dim;
  for (int p = 0; p < 4; ++p) {
    const int at = (int[]){QKV, O, GATE_UP, DOWN}[p];
    require(w[at].dtype() == mx::uint32 && w[at].ndim() == 2, "weights must be 2-D uint32");
    require(scale_supported(w[at + 1].dtype()) && w[at + 2].dtype() == w[at + 1].dtype(),
            "scales and biases must be float32, float16 or bfloat16, both the same");
    require(s.bits[p] == 2 || s.bits[p] == 4 || s.bits[p] == 8, "bits must be 2, 4 or 8");
    const int k = w[at].shape(1) * 32 / s.bits[p];
    require(s.group_size[p] > 0 && k % s.group_size[p] == 0 && w[at + 1].ndim() == 2 &&
                w[at + 1].shape(1) == k / s.group_size[p] && w[at + 1].shape() == w[at + 2].shape() &&
                w[at + 1].shape(0) == w[at].shape(0),
            "scales do not match the weights");
  }
  const auto k_of = [&](int at, int p) { return w[at].shape(1) * 32 / s.bits[p]; };
  require(k_of(QKV, 0) == D && w[QKV].shape(0) == (H + 2 * Hkv) * Dh, "qkv_proj has the wrong shape");
  require(k_of(O, 1) == H * Dh && w[O].shape(0) == D, "o_proj has the wrong shape");
  require(k_of(GATE_UP, 2) == D && w[GATE_UP].shape(0) % 2 == 0, "gate_up_proj has the wrong shape");
  require(k_of(DOWN, 3) == w[GATE_UP].shape(0) / 2 && w[DOWN].shape(0) == D, "down_proj has the wrong shape");
  for (int at : {NORM_IN, NORM_POST}) {
    require(w[at].dtype() == mx::float32 && w[at].size() == static_cast<size_t>(D), "norm weights must be (D,) float32");
  }
}

} // namespace

std::vector<mx::array> decode_layers(const mx::array& x, const std::vector<std::vector<mx::array>>& layers,
                                     const std::vector<mx::array>& keys, const std::vector<mx::array>& values,
                                     const mx::array& cos, const mx::array& sin, const std::vector<BlockShape>& shapes,
                                     int offset) {
  const int L = static_cast<int>(layers.size());
  require(L > 0 && static_cast<int>(keys.size()) == L && static_cast<int>(values.size()) == L &&
              static_cast<int>(shapes.size()) == L,
          "one KV cache and one shape per layer");
  require(x.dtype() == mx::float32 && x.size() == static_cast<size_t>(x.shape(-1)), "x must be float32 (1, 1, D)");
  const int D = x.shape(-1);
  for (int i = 0; i < L; ++i) {
    const auto& s = shapes[i];
    const int H = s.n_heads, Hkv = s.n_kv_heads, Dh = s.head_dim;
    require(H > 0 && Hkv > 0 && H % Hkv == 0 && Dh > 0 && Dh % 2 == 0, "bad head counts");
    require(Dh == shapes[0].head_dim, "every layer has the same head dim");
    check_layer(layers[i], s, D);
    for (const auto* c : {&keys[i], &values[i]}) {
      require(c->dtype() == mx::float32 && c->ndim() == 4 && c->shape(0) == 1 && c->shape(1) == Hkv &&
                  c->shape(3) == Dh,
              "the KV cache must be float32 (1, Hkv, capacity, Dh)");
      require(offset >= 0 && offset < c->shape(2), "offset outside the KV cache");
    }
  }
  const int Dh = shapes[0].head_dim;
  require(cos.dtype() == mx::float32 && cos.size() == static_cast<size_t>(Dh) && sin.dtype() == mx::float32 &&
              sin.size() == static_cast<size_t>(Dh),
          "rope rows must be (Dh,) float32");
  auto stream = mx::default_stream(mx::Device(mx::Device::cpu));
  const auto& w0 = layers[0];
  // layer i reads x from the start of `src` and its q, k, v from element qkv_at of `qkv`
  mx::array src = x;
  mx::array qkv = mx::array({(shapes[0].n_heads + 2 * shapes[0].n_kv_heads) * Dh}, mx::float32,
                            std::make_shared<DecodeQKV>(stream, shapes[0]),
                            {x, w0[NORM_IN], w0[QKV], w0[QKV + 1], w0[QKV + 2], cos, sin});
  int qkv_at = 0;
  std::vector<mx::array> out_keys, out_values;
  for (int i = 0; i < L; ++i) {
    const auto& s = shapes[i];
    const auto& w = layers[i];
    const int H = s.n_heads, Hkv = s.n_kv_heads;
    out_keys.push_back(mx::array(keys[i].shape(), mx::float32,
                                 std::make_shared<CacheWrite>(stream, qkv_at + H * Dh, offset), {keys[i], qkv}));
    out_values.push_back(mx::array(values[i].shape(), mx::float32,
                                   std::make_shared<CacheWrite>(stream, qkv_at + (H + Hkv) * Dh, offset),
                                   {values[i], qkv}));
    std::vector<mx::array> rest{src, qkv, out_keys.back(), out_values.back()};
    for (int at = O; at < WEIGHTS; ++at) rest.push_back(w[at]);
    const bool last = i + 1 == L;
    mx::Shape shape = x.shape();
    std::optional<BlockShape> next;
    if (!last) { // this block also computes the next one's q, k, v: out = [x (D) | qkv]
      const auto& n = layers[i + 1];
      next = shapes[i + 1];
      for (int at : {int(NORM_IN), int(QKV), QKV + 1, QKV + 2}) rest.push_back(n[at]);
      rest.push_back(cos);
      rest.push_back(sin);
      shape = {D + (next->n_heads + 2 * next->n_kv_heads) * Dh};
    }
    auto out = mx::array(std::move(shape), mx::float32, std::make_shared<DecodeRest>(stream, s, next, offset, qkv_at),
                         std::move(rest));
    src = out, qkv = out, qkv_at = D;
  }
  std::vector<mx::array> result{src};
  result.insert(result.end(), out_keys.begin(), out_keys.end());
  result.insert(result.end(), out_values.begin(), out_values.end());
  return result;
}

// DecodeQKV: inputs x, norm, w, scales, biases, cos, sin
void DecodeQKV::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  require_contiguous(inputs, 1);
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& a : inputs) encoder.set_input_array(a);
  encoder.set_output_array(out);
  encoder.dispatch([in = weak(inputs), out = mx::array::unsafe_weak_copy(out), s = shape_]() mutable {
    const int D = in[0].shape(-1);
    thread_local std::vector<float> xs;
    xs.resize(D);
    gather(in[0], D, xs.data());
    qkv_rows(xs.data(), D, in, 1, s, out.data<float>());
  });
}

// CacheWrite: inputs cache (1, Hkv, C, Dh), qkv source; writes Hkv rows from element first_
void CacheWrite::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& cache = inputs[0];
  require_contiguous(inputs, 0);
  const bool copy = !cache.is_donatable();
  if (copy) {
    cache_copies.fetch_add(1);
    out.set_data(mx::allocator::malloc(out.nbytes()));
  } else {
    out.copy_shared_buffer(cache);
  }
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& a : inputs) encoder.set_input_array(a);
  encoder.set_output_array(out);
  encoder.dispatch([in = weak(inputs), out = mx::array::unsafe_weak_copy(out), copy, first = first_,
                    offset = offset_]() mutable {
    float* dst = out.data<float>();
    if (copy) std::memcpy(dst, in[0].data<float>(), in[0].nbytes());
    const int Hkv = in[0].shape(1), C = in[0].shape(2), Dh = in[0].shape(3);
    const float* src = in[1].data<float>() + first;
    for (int kh = 0; kh < Hkv; ++kh) {
      std::memcpy(dst + (static_cast<size_t>(kh) * C + offset) * Dh, src + kh * Dh, sizeof(float) * Dh);
    }
  });
}

// DecodeRest: inputs src, qkv source, keys, values, o w/s/b, post_norm, gate_up w/s/b, down w/s/b
// [, next input_norm, next qkv w/s/b, cos, sin]
void DecodeRest::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  require_contiguous(inputs, 1);
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& a : inputs) encoder.set_input_array(a);
  encoder.set_output_array(out);
  encoder.dispatch([in = weak(inputs), out = mx::array::unsafe_weak_copy(out), s = shape_, next = next_,
                    offset = offset_, qkv_at = qkv_at_]() mutable {
    const int H = s.n_heads, Hkv = s.n_kv_heads, Dh = s.head_dim, C = in[2].shape(2);
    const Proj o = proj(in, 4, s.group_size[1], s.bits[1]), gate_up = proj(in, 8, s.group_size[2], s.bits[2]),
               down = proj(in, 11, s.group_size[3], s.bits[3]);
    const int D = o.n, F = gate_up.n / 2;
    const size_t plane = static_cast<size_t>(C) * Dh; // one KV head's buffer
    thread_local std::vector<float> xs, h, att, gu, tmp;
    xs.resize(D), h.resize(D), tmp.resize(D), att.resize(static_cast<size_t>(H) * Dh), gu.resize(gate_up.n);
    gather(in[0], D, xs.data());

    // attention over positions 0 .. offset; (pointers, not the thread_local vectors: a worker
    // thread would see its own, empty ones)
    const float* q = in[1].data<float>() + qkv_at;
    const float* keys = in[2].data<float>();
    const float* values = in[3].data<float>();
    float* att_out = att.data();
    const int n = offset + 1, rep = H / Hkv;
    const float scale = s.scale;
    auto head_task = [=](int head) {
      thread_local std::vector<float> sc;
      sc.resize(n);
      const int kh = head / rep;
      attend(q + head * Dh, keys + kh * plane, values + kh * plane, n, Dh, scale, sc.data(), att_out + head * Dh);
    };
    if (static_cast<size_t>(n) * H * Dh >= (1 << 16) && detail::pool_threads() > 1) {
      detail::parallel_for(H, head_task);
    } else {
      for (int head = 0; head < H; ++head) head_task(head);
    }
    matvec(o, att.data(), tmp.data());
    for (int i = 0; i < D; ++i) xs[i] += tmp[i];

    // MLP
    rms_norm(xs.data(), in[7].data<float>(), s.norm_eps, h.data(), D);
    matvec(gate_up, h.data(), gu.data()); // [gate (F) | up (F)]
    for (int i = 0; i < F; ++i) {
      const float g = gu[i];
      gu[i] = g / (1.f + std::exp(-g)) * gu[F + i];
    }
    float* result = out.data<float>();
    matvec(down, gu.data(), result);
    for (int i = 0; i < D; ++i) result[i] += xs[i];
    if (next) qkv_rows(result, D, in, 14, *next, result + D); // the next block's q, k, v
  });
}

void DecodeQKV::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[decode_layers] runs on the CPU only");
}
void CacheWrite::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[decode_layers] runs on the CPU only");
}
void DecodeRest::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[decode_layers] runs on the CPU only");
}

bool DecodeQKV::is_equivalent(const mx::Primitive& other) const {
  return same(shape_, static_cast<const DecodeQKV&>(other).shape_);
}
bool CacheWrite::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const CacheWrite&>(other);
  return first_ == o.first_ && offset_ == o.offset_;
}
bool DecodeRest::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const DecodeRest&>(other);
  return offset_ == o.offset_ && qkv_at_ == o.qkv_at_ && same(shape_, o.shape_) &&
         next_.has_value() == o.next_.has_value() && (!next_ || same(*next_, *o.next_));
}

} // namespace mlxllama
