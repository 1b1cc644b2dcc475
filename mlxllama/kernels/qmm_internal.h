// What the kernel's C++ files share beyond qmm.h: the matmul on raw buffers and the thread pool.
#pragma once

#include <cstdint>
#include <functional>

#include "mlx/mlx.h"

namespace mlxllama {

// The types scales and biases may have (both the same).
enum class ScaleType : int { f32, f16, bf16 };

inline bool scale_supported(mlx::core::Dtype t) {
  return t == mlx::core::float32 || t == mlx::core::float16 || t == mlx::core::bfloat16;
}

inline ScaleType scale_type(mlx::core::Dtype t) {
  return t == mlx::core::float16 ? ScaleType::f16 : t == mlx::core::bfloat16 ? ScaleType::bf16 : ScaleType::f32;
}

} // namespace mlxllama

namespace mlxllama::detail {

// out (M, N) = x (M, K, row-contiguous) @ dequantize(w, scales, biases).T, affine layout of qmm.h.
void qmm_rows(const float* x, int M, int K, const uint32_t* w, const void* scales, const void* biases,
              ScaleType st, float* out, int N, int group_size, int bits);

// f(0) .. f(tasks - 1) over the kernel's thread pool; returns when all are done.
void parallel_for(int tasks, const std::function<void(int)>& f);
int pool_threads();

} // namespace mlxllama::detail
