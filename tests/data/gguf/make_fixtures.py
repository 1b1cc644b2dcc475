"""Make the GGUF fixtures of this folder: a tiny random llama (hidden size 256, so that every row is a
whole number of K-quant blocks) written as F16 with gguf-py, then quantized by llama.cpp itself.

    pip install llama-cpp-python==0.3.36      # builds llama.cpp (minutes)
    python tests/data/gguf/make_fixtures.py

Writes tiny-<TYPE>.gguf for each llama.cpp file type below; tests read them without llama.cpp.
tests/gguf_quantize.py (llama.cpp's block quantizer from the xllamacpp wheel) rebuilds all of them
but IQ3_S byte for byte (tests/test_gguf_quantize.py).
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/: gguf_tiny

# llama.cpp file type name -> llama_ftype number (llama.h); IQ3_XXS and the IQ2 / IQ1 types need an
# importance matrix, which llama.cpp requires for them
FTYPES = {"Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "Q3_K_M": 12, "Q2_K": 10, "IQ4_NL": 25, "IQ4_XS": 30,
          "IQ3_S": 26, "Q5_0": 8, "Q5_1": 9}


def main() -> None:
    import llama_cpp
    from gguf_tiny import float_weights, write_gguf

    f16 = HERE / "tiny-F16.gguf"
    write_gguf(f16, {n: ("F16" if w.ndim == 2 else "F32", w) for n, w in float_weights(seed=7).items()})
    for name, ftype in FTYPES.items():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = 2
        out = HERE / f"tiny-{name}.gguf"
        rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), ctypes.byref(params))
        print(f"{out.name}: {'ok' if rc == 0 else f'failed ({rc})'}")
        if rc != 0:
            out.unlink(missing_ok=True)
    f16.unlink()  # the source is not a fixture (the tests need only llama.cpp's output)


if __name__ == "__main__":
    main()
