// Affine quantized matmul for MLX's CPU backend: out = x @ dequantize(w).T
//   x (..., K) float32, w (N, K * bits / 32) uint32, scales / biases (N, K / group_size) float32.
#pragma once

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mlxllama {

namespace mx = mlx::core;

// Whether the kernel handles this (bits, group_size) pair (the rest stays with mx.quantized_matmul).
bool qmm_supported(int bits, int group_size);

// Builds the graph node; runs on the CPU stream.
mx::array qmm(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int group_size,
    int bits);

// The instruction set the kernel picked at run time: "avx512", "avx2", or "generic".
const char* qmm_isa();

// Activations with more rows than this (at most 16) take the dequantize-tile + sgemm path.
int qmm_max_rows();
void set_qmm_max_rows(int rows);

// Worker threads used by the kernel (including the calling one).
int qmm_threads();
void set_qmm_threads(int n);

class QuantizedMatmulCPU : public mx::UnaryPrimitive {
 public:
  QuantizedMatmulCPU(mx::Stream stream, int group_size, int bits)
      : mx::UnaryPrimitive(stream), group_size_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

  const char* name() const override {
    return "QuantizedMatmulCPU";
  }

  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int group_size_;
  int bits_;
};

} // namespace mlxllama
