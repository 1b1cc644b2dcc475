"""An MLX model folder -> one GGUF file that llama.cpp (Ollama, LM Studio) loads.

Per module: 4-bit weights (any group size) become Q4_1 and 5-bit ones Q5_1, exactly (each MLX
group's scale and bias are the blocks' d and m, in float16); 8-bit weights become Q8_0 (llama.cpp's
own rounding of the dequantized values; exact when they are symmetric, as an imported Q8_0 is) or,
with q8="f16", F16; other bit widths and float
matrices F16; norms and biases F32. Q/K rows are permuted into llama.cpp's rope layout. Tensors are
written one at a time into a temporary file beside the output, renamed into place at the end.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
from gguf import GGUFWriter, quants
from gguf.constants import GGMLQuantizationType as T

from mlxllama.errors import ConversionError, InputError, WeightsError

from .gguf_config import gguf_module, metadata_from_config, permute, rope_heads
from .gguf_vocab import add_vocab, vocab_metadata
from .writer import os_error

Q8_CHOICES = ("q8_0", "f16")


def unpack(words: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """MLX packed uint32 (rows, cols * bits / 32) -> levels (rows, cols) uint8."""
    rows = words.shape[0]
    if bits == 8:
        return np.ascontiguousarray(words).view(np.uint8).reshape(rows, cols)
    if bits == 4:
        b = np.ascontiguousarray(words).view(np.uint8).reshape(rows, cols // 2, 1)
        return np.concatenate([b & 0x0F, b >> 4], axis=2).reshape(rows, cols)
    p = 8 // math.gcd(8, bits)
    nbytes = p * bits // 8
    b = np.ascontiguousarray(words).view(np.uint8).reshape(rows, cols // p, nbytes)
    v = np.zeros((rows, cols // p, 8), np.uint8)
    v[..., :nbytes] = b
    v = v.view(np.uint64)[..., 0]
    mask = np.uint64((1 << bits) - 1)
    return np.stack([(v >> np.uint64(k * bits)) & mask for k in range(p)], axis=-1).reshape(rows, cols).astype(np.uint8)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def q4_1_blocks(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """levels (n, 32), d and m (n,) -> Q4_1 blocks (n, 20)."""
    qs = q[:, :16] | (q[:, 16:] << 4)
    return np.concatenate([_f16_bytes(d), _f16_bytes(m), qs], axis=1)


def q5_1_blocks(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """levels (n, 32), d and m (n,) -> Q5_1 blocks (n, 24)."""
    qh = np.packbits((q >> 4) & 1, axis=1, bitorder="little")
    qs = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
    return np.concatenate([_f16_bytes(d), _f16_bytes(m), qh, qs], axis=1)


_AFFINE = {4: (T.Q4_1, q4_1_blocks), 5: (T.Q5_1, q5_1_blocks)}


def _float32(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def _plan(name: str, weights: dict, spec: dict | None, q8: str):
    """(GGML type, logical shape, producer of its bytes) for one MLX tensor."""
    base = name.rsplit(".", 1)[0]
    w = weights[name]
    if spec is not None and name.endswith(".weight") and f"{base}.scales" in weights:
        bits, group = spec["bits"], spec["group_size"]
        rows, cols = w.shape[0], w.shape[1] * 32 // bits
        scales, biases = weights[f"{base}.scales"], weights[f"{base}.biases"]
        if bits in _AFFINE:
            qtype, blocks = _AFFINE[bits]

            def affine():
                q = unpack(np.array(w), bits, cols).reshape(-1, 32)
                rep = group // 32  # a group of 64 or 128 is 2 or 4 blocks sharing d and m
                d = np.repeat(_float32(scales).reshape(-1), rep)
                m = np.repeat(_float32(biases).reshape(-1), rep)
                return blocks(q, d, m).reshape(rows, -1)

            return qtype, (rows, cols), affine

        def dense():
            return _float32(mx.dequantize(w, scales, biases, group_size=group, bits=bits))

        def q8_0():
            sc, bi = _float32(scales), _float32(biases)
            if group == 32 and np.array_equal(bi, -128 * sc):  # symmetric already (an imported Q8_0): exact
                q = (unpack(np.array(w), 8, cols).astype(np.int16) - 128).astype(np.int8).view(np.uint8)
                return np.concatenate([_f16_bytes(sc.reshape(-1)), q.reshape(-1, 32)], axis=1).reshape(rows, -1)
            return quants.quantize(dense(), T.Q8_0)

        if bits == 8 and q8 == "q8_0":
            return T.Q8_0, (rows, cols), q8_0
        return T.F16, (rows, cols), lambda: dense().astype(np.float16)
    if w.ndim == 2 and w.shape[-1] % 32 == 0 and not name.endswith(".bias") and "norm" not in name:
        return T.F16, tuple(w.shape), lambda: _float32(w).astype(np.float16)
    return T.F32, tuple(w.shape), lambda: _float32(w)


def _module_spec(config: dict, module: str) -> dict | None:
    q = config.get("quantization") or config.get("quantization_config")
    if not isinstance(q, dict) or "bits" not in q:
        return None
    own = q.get(module)
    if own is False:
        return None
    return own if isinstance(own, dict) else {"bits": q["bits"], "group_size": q["group_size"]}


def export_gguf(model: str | os.PathLike | None, out: str | os.PathLike, *, q8: str = "q8_0",
                force: bool = False) -> Path:
    """Write the MLX model folder `model` (or the default model for None) as the GGUF file `out`."""
    from mlxllama.resolve import resolve_model
    from mlxllama.loader import load_weights, read_json, weight_files

    if q8 not in Q8_CHOICES:
        raise InputError(f"q8 must be one of {', '.join(Q8_CHOICES)}, got {q8!r}")
    folder = resolve_model(model)
    out = Path(out).expanduser()
    if (out.exists() or out.is_symlink()) and not force:
        raise ConversionError(f"output {out} already exists; pass force=True (--force) to replace it")
    config = read_json(folder / "config.json")
    arch, arch_keys = metadata_from_config(config)
    vocab = vocab_metadata(folder, config)
    weights = load_weights(weight_files(folder))
    tied = config.get("tie_word_embeddings", "lm_head.weight" not in weights)
    if not tied and "lm_head.weight" not in weights:
        raise WeightsError(f"{folder}: no lm_head.weight and tie_word_embeddings is false")
    kv_config = {**config, "num_key_value_heads": config.get("num_key_value_heads") or config["num_attention_heads"]}

    entries = []  # (gguf name, type, shape, producer)
    for name in weights:
        module, _, leaf = name.rpartition(".")
        if leaf in ("scales", "biases") and f"{module}.weight" in weights and f"{module}.scales" in weights:
            continue
        if tied and module == "lm_head":
            continue
        g = gguf_module(module)
        if g is None or leaf not in ("weight", "bias"):
            raise WeightsError(f"{folder}: tensor {name} has no GGUF counterpart")
        qtype, shape, produce = _plan(name, weights, _module_spec(config, module), q8)
        heads = rope_heads(module, kv_config)
        if heads is not None:
            produce = (lambda p, h: lambda: permute(p(), h))(produce, heads)
        entries.append((f"{g}.{leaf}", qtype, shape, produce))
    entries.sort(key=lambda e: (not e[0].startswith("token_embd"), e[0]))

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
        os.close(fd)
    except OSError as e:
        raise os_error(e, out.parent) from None
    try:
        writer = GGUFWriter(tmp, arch)
        writer.add_name(config.get("_name_or_path") or folder.name)
        for key, value in arch_keys.items():
            _add_arch_key(writer, f"{arch}.{key}", value)
        add_vocab(writer, vocab)
        writer.add_quantization_version(2)
        for gname, qtype, shape, _ in entries:
            block, size = quants.GGML_QUANT_SIZES[qtype]
            nbytes = math.prod(shape) // block * size
            if block > 1:  # gguf-py takes the byte shape of quantized tensors
                writer.add_tensor_info(gname, (*shape[:-1], shape[-1] // block * size), np.dtype(np.uint8),
                                       nbytes, raw_dtype=qtype)
            else:
                writer.add_tensor_info(gname, shape, np.dtype(np.float16 if qtype == T.F16 else np.float32),
                                       nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, _, _, produce in entries:
            writer.write_tensor_data(np.ascontiguousarray(produce()))
        writer.close()
        os.replace(tmp, out)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise os_error(e, out) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _add_arch_key(writer, key: str, value) -> None:
    if isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_uint32(key, int(value))
