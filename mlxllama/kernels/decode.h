// One transformer block of a Llama-family model for one new token, as four CPU primitives:
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

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mlxllama {

namespace mx = mlx::core;

struct BlockShape {
  int n_heads, n_kv_heads, head_dim;
  float norm_eps, scale; // RMSNorm epsilon, attention scale
  std::array<int, 4> group_size, bits; // qkv, o, gate_up, down
};

// inputs: x (1, 1, D); input_norm (D); qkv w/scales/biases; o w/s/b; post_norm (D); gate_up w/s/b;
// down w/s/b; keys, values (1, Hkv, C, Dh); cos, sin (Dh) (sin with the rotation's sign folded in,
// models/host_ops.py's RopeTable). Returns [out (1, 1, D), keys, values]: the caches with the new
// position written.
std::vector<mx::array> decode_block(const std::vector<mx::array>& inputs, const BlockShape& shape, int offset);

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
  // writes heads first_head .. first_head + Hkv - 1 of qkv at position offset
  CacheWrite(mx::Stream stream, int first_head, int offset)
      : mx::UnaryPrimitive(stream), first_head_(first_head), offset_(offset) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "CacheWrite";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int first_head_, offset_;
};

class DecodeRest : public mx::UnaryPrimitive {
 public:
  DecodeRest(mx::Stream stream, BlockShape shape, int offset)
      : mx::UnaryPrimitive(stream), shape_(shape), offset_(offset) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "DecodeRest";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  BlockShape shape_;
  int offset_;
};

} // namespace mlxllama
