"""llama.cpp's quantization of a float GGUF without a llama.cpp build: `llama-quantize SRC OUT TYPE`.

    python tests/gguf_quantize.py model-F16.gguf model-Q4_K_M.gguf Q4_K_M

The blocks come from llama.cpp's own quantizer (`ggml_quantize_chunk`, through ctypes, from the
shared object of the xllamacpp wheel, or of llama-cpp-python); the file is gguf-py's reading and
writing; the type of each tensor follows llama-quantize's rules for the file types below (its
`llama_tensor_get_type`, for dense llama-family models without an importance matrix), including its
fallbacks when a row length is not a multiple of a K-quant's 256 values (SmolLM2's 576: Q4_K ->
Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K / Q3_K -> Q4_0, IQ4_XS -> IQ4_NL). Tensors are in llama.cpp's order
(the unnumbered ones, then block by block, by name within each).

Run it in a process of its own (tests do): it loads llama.cpp's library into the process.
"""

from __future__ import annotations

import ctypes
import re
import sys
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType, GGUFWriter, Keys
from gguf.constants import GGMLQuantizationType as T
from gguf.constants import LlamaFileType

# file type -> the type most matrices get (llama_ftype_get_default_type)
DEFAULT_TYPE = {"Q4_0": T.Q4_0, "Q4_1": T.Q4_1, "Q5_0": T.Q5_0, "Q5_1": T.Q5_1, "Q8_0": T.Q8_0,
                "Q2_K": T.Q2_K, "Q3_K_S": T.Q3_K, "Q3_K_M": T.Q3_K, "Q3_K_L": T.Q3_K, "Q4_K_S": T.Q4_K,
                "Q4_K_M": T.Q4_K, "Q5_K_S": T.Q5_K, "Q5_K_M": T.Q5_K, "Q6_K": T.Q6_K, "IQ4_NL": T.IQ4_NL,
                "IQ4_XS": T.IQ4_XS}
FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.IQ4_XS: T.IQ4_NL, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1,
            T.Q6_K: T.Q8_0}


def _library() -> ctypes.CDLL:
    """A shared object exporting ggml_quantize_chunk: xllamacpp's, else llama-cpp-python's ggml."""
    candidates = []
    try:
        import xllamacpp

        candidates += sorted(Path(xllamacpp.__file__).parent.glob("xllamacpp*.so"))
    except ImportError:
        pass
    try:
        import importlib.util

        spec = importlib.util.find_spec("llama_cpp")
        if spec and spec.origin:
            candidates += sorted((Path(spec.origin).parent / "lib").glob("libggml-base.*"))
    except ImportError:
        pass
    for path in candidates:
        lib = ctypes.CDLL(str(path))
        if hasattr(lib, "ggml_quantize_chunk"):
            lib.ggml_quantize_chunk.restype = ctypes.c_size_t
            lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
            lib.ggml_validate_row_data.restype = ctypes.c_bool
            lib.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
            return lib
    raise SystemExit("no llama.cpp library with ggml_quantize_chunk: pip install xllamacpp")


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def target_type(name: str, shape: tuple[int, ...], ftype: str, n_layer: int, gqa: int, tied: bool,
                counters: dict) -> T | None:
    """llama-quantize's choice for one tensor (None: keep its type). shape is GGUF order (ne0 first)."""
    if len(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return None
    new = DEFAULT_TYPE[ftype]
    nx = shape[0]
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        qk = GGML_QUANT_SIZES[new][0]
        new = T.Q8_0 if nx % qk else (T.Q6_K if new != T.Q8_0 else new)
    elif name == "token_embd.weight":
        pass
    elif "attn_v.weight" in name:
        i, n = counters["attn_v"], counters["n_attn_v"]
        if ftype == "Q2_K":
            new = T.Q4_K if gqa >= 4 else T.Q3_K
        elif ftype in ("IQ4_NL", "IQ4_XS") and gqa >= 4:
            new = T.Q5_K
        elif ftype == "Q3_K_M":
            new = T.Q5_K if i < 2 else T.Q4_K
        elif ftype == "Q3_K_L":
            new = T.Q5_K
        elif ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
            new = T.Q6_K
        elif ftype == "Q4_K_S" and i < 4:
            new = T.Q5_K
        counters["attn_v"] += 1
    elif "ffn_down" in name:
        i, n = counters["ffn_down"], n_layer
        if ftype == "Q2_K":
            new = T.Q3_K
        elif ftype == "Q3_K_M":
            new = T.Q5_K if i < n // 16 else T.Q4_K
        elif ftype == "Q3_K_L":
            new = T.Q5_K
        elif ftype == "Q4_K_M":
            if use_more_bits(i, n):
                new = T.Q6_K
        elif i < n // 8 and ftype in ("IQ4_NL", "IQ4_XS"):
            new = T.Q5_K
        elif ftype == "Q5_K_M" and use_more_bits(i, n):
            new = T.Q6_K
        elif ftype == "Q4_K_S" and i < n // 8:
            new = T.Q5_K
        counters["ffn_down"] += 1
    elif "attn_output.weight" in name:
        new = {"Q2_K": T.Q3_K, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K}.get(ftype, new)
    if nx % GGML_QUANT_SIZES[new][0]:
        new = FALLBACK[new]
        if nx % GGML_QUANT_SIZES[new][0]:
            new = T.F16
    return new


def _order(name: str) -> tuple[int, str]:
    return _layer(name), name


def _copy_metadata(reader: GGUFReader, writer: GGUFWriter, ftype: str) -> None:
    for field in reader.fields.values():
        if field.name == Keys.General.ARCHITECTURE or field.name.startswith("GGUF.") or \
                field.name in (Keys.General.FILE_TYPE, Keys.General.QUANTIZATION_VERSION):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    writer.add_quantization_version(2)
    writer.add_file_type(int(getattr(LlamaFileType, f"MOSTLY_{ftype}")))


def quantize(src: str | Path, out: str | Path, ftype: str) -> dict[str, str]:
    """Write `out`: the F16/BF16/F32 GGUF `src` quantized as llama-quantize's `ftype`. Returns each
    tensor's type name."""
    if ftype not in DEFAULT_TYPE:
        raise SystemExit(f"unsupported file type {ftype!r} (choose from {', '.join(DEFAULT_TYPE)})")
    from gguf import quants

    lib = _library()
    reader = GGUFReader(src)
    arch = str(reader.fields[Keys.General.ARCHITECTURE].contents())
    n_layer = int(reader.fields[f"{arch}.block_count"].contents())
    heads = int(reader.fields[f"{arch}.attention.head_count"].contents())
    kv = int(reader.fields[f"{arch}.attention.head_count_kv"].contents()) if \
        f"{arch}.attention.head_count_kv" in reader.fields else heads
    tensors = sorted(reader.tensors, key=lambda t: _order(t.name))
    names = {t.name for t in tensors}
    counters = {"attn_v": 0, "ffn_down": 0, "n_attn_v": sum("attn_v.weight" in n for n in names)}
    writer = GGUFWriter(out, arch)
    _copy_metadata(reader, writer, ftype)
    types = {}
    for t in tensors:
        shape = tuple(int(x) for x in t.shape)  # ne0 first
        new = target_type(t.name, shape, ftype, n_layer, heads // kv, "output.weight" not in names, counters)
        src_type = T(t.tensor_type)
        if new is None or new == src_type:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=src_type)
            types[t.name] = src_type.name
            continue
        x = np.ascontiguousarray(quants.dequantize(np.asarray(t.data), src_type), dtype=np.float32)
        rows, n_per_row = x.size // shape[0], shape[0]
        if new == T.F16:
            dst = x.astype(np.float16).reshape(rows, n_per_row)
        else:
            block, nbytes = GGML_QUANT_SIZES[new]
            dst = np.empty((rows, n_per_row // block * nbytes), np.uint8)  # the byte shape gguf-py expects
            size = lib.ggml_quantize_chunk(int(new), x.ctypes.data, dst.ctypes.data, 0, rows, n_per_row, None)
            assert size == dst.size and lib.ggml_validate_row_data(int(new), dst.ctypes.data, size), t.name
        writer.add_tensor(t.name, dst, raw_dtype=new)
        types[t.name] = new.name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__.split("\n\n")[1])
    quantize(sys.argv[1], sys.argv[2], sys.argv[3])
