// Python module mlxllama.kernels._qmm (nanobind, in MLX's binding domain so mx.array passes through).
#include <nanobind/nanobind.h>

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
  m.def("set_threads", &mlxllama::set_qmm_threads, "n"_a, "Threads for the kernel (0: one per available core).");
}
