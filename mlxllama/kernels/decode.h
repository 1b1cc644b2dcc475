// The transformer blocks of a Llama-family model for one new token, each as CPU primitives:
//   qkv    = rope(qkv_proj(rms_norm(x)))                     DecodeQKV   (q and k rotated)
//   keys   = keys with qkv's key written at `offset`         CacheWrite  (the buffer reused when
//   values = values with qkv's value written at `offset`     CacheWrite   nothing else holds it)
//   out    = h + down_proj(silu(gate) * up), [gate, up] = gate_up_proj(rms_norm(h)),
//            h = x + o_proj(attention(q, keys, values))      DecodeRest
// The projections are quantized (qmm.h's layout, q/k/v and gate/up stacked); the KV cache is the
// preallocated buffer (1, Hkv, capacity, Dh) of models/cache.py's KVCache. (Four single-output
// primitives, not one with three outputs: MLX reuses an input's buffer only when one array holds it,
// and every output of a primitive holds all of its inputs.)
#pragma once

#include <array>
#include <optional>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mlxllama {

namespace mx = mlx::core;

struct BlockShape {
  int n_heads, n_kv_heads, head_dim;
  float norm_eps, scale; // RMSNorm epsilon, attention scale
  std::array<int, 4> group_size, bits; // qkv, o, gate_up, down
};

// All blocks of a model for one token. x (1, 1, D); per layer: input_norm (D), qkv w/scales/biases,
// o w/s/b, post_norm (D), gate_up w/s/b, down w/s/b; keys[i], values[i] (1, Hkv, C, Dh); the
// token's rotary rows cos, sin (Dh) (sin with the rotation's sign folded in, models/host_ops.py).
// Returns [out (1, 1, D), keys..., values...]: the caches with the new position written. Each block
// but the last also computes the next one's q, k, v (its output is [x | qkv]), so a model of L
// layers is 3 L + 1 operations.
std::vector<mx::array> decode_layers(const mx::array& x, const std::vector<std::vector<mx::array>>& layers,
                                     const std::vector<mx::array>& keys, const std::vector<mx::array>& values,
                                     const mx::array& cos, const mx::array& sin, const std::vector<BlockShape>& shapes,
                                     int offset);

// How many times a cache buffer had to be copied because something else held it (tests, profiling).
int64_t decode_cache_copies();

class DecodeQKV : public mx::UnaryPrimitive {
 public:
  DecodeQKV(mx::Stream stream, BlockShape shape) : mx::UnaryPrimitive(stream), shape_(shape) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "DecodeQKV";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  BlockShape shape_;
};

class CacheWrite : public mx::UnaryPrimitive {
 public:
  // writes Hkv rows of Dh floats of the source, from element `first`, at position offset
  CacheWrite(mx::Stream stream, int first, int offset) : mx::UnaryPrimitive(stream), first_(first), offset_(offset) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "CacheWrite";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int first_, offset_;
};

class DecodeRest : public mx::UnaryPrimitive {
 public:
  // x at the start of input 0, q, k, v from element qkv_at of input 1; next: the following block's
  // shape when this one also computes its q, k, v
  DecodeRest(mx::Stream stream, BlockShape shape, std::optional<BlockShape> next, int offset, int qkv_at)
      : mx::UnaryPrimitive(stream), shape_(shape), next_(next), offset_(offset), qkv_at_(qkv_at) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "DecodeRest";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  BlockShape shape_;
  std::optional<BlockShape> next_;
  int offset_, qkv_at_;
};

} // namespace mlxllama
