// Python module mlxllama.kernels._qmm (nanobind, in MLX's binding domain so mx.array passes through).
#include <nanobind/nanobind.h>

#include <nanobind/stl/array.h>
#include <nanobind/stl/vector.h>

#include "decode.h"
#include "qmm.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_qmm, m) {
  m.doc() = "Affine quantized matmul for MLX's CPU backend";
  m.def("quantized_matmul", &mlxllama::qmm, "x"_a, "w"_a, "scales"_a, "biases"_a, "group_size"_a, "bits"_a,
        "x @ dequantize(w, scales, biases).T on the CPU (x float32, w packed uint32).");
  m.def("supported", &mlxllama::qmm_supported, "bits"_a, "group_size"_a);
  m.def("isa", &mlxllama::qmm_isa, "The vector instruction set chosen at run time.");
  m.def("max_rows", &mlxllama::qmm_max_rows);
  m.def("set_max_rows", &mlxllama::set_qmm_max_rows, "rows"_a,
        "Rows up to which the vector kernel runs; more take dequantized tiles + sgemm.");
  m.def("threads", &mlxllama::qmm_threads);
  m.def(
      "decode_layers",
      [](const mlxllama::mx::array& x, const std::vector<std::vector<mlxllama::mx::array>>& layers,
         const std::vector<mlxllama::mx::array>& keys, const std::vector<mlxllama::mx::array>& values,
         const mlxllama::mx::array& cos, const mlxllama::mx::array& sin, int n_heads, int n_kv_heads, int head_dim,
         float norm_eps, float scale, const std::vector<std::array<int, 4>>& group_size,
         const std::vector<std::array<int, 4>>& bits, int offset) {
        std::vector<mlxllama::BlockShape> shapes;
        for (size_t i = 0; i < group_size.size() && i < bits.size(); ++i) {
          shapes.push_back({n_heads, n_kv_heads, head_dim, norm_eps, scale, group_size[i], bits[i]});
        }
        return mlxllama::decode_layers(x, layers, keys, values, cos, sin, shapes, offset);
      },
      "x"_a, "layers"_a, "keys"_a, "values"_a, "cos"_a, "sin"_a, "n_heads"_a, "n_kv_heads"_a, "head_dim"_a,
      "norm_eps"_a, "scale"_a, "group_size"_a, "bits"_a, "offset"_a,
      "The model's blocks for one token (decode.h): [out, keys..., values...].");
  m.def("decode_cache_copies", &mlxllama::decode_cache_copies,
        "How often decode_layers copied a KV cache buffer instead of writing it in place.");
  m.def("set_threads", &mlxllama::set_qmm_threads, "n"_a, "Threads for the kernel (0: one per available core).");
}
