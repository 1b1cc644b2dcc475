"""Property-based fuzzing of the GGUF reader: hostile headers, metadata tables and tensor tables, and
truncation at every byte. Whatever the bytes, reading returns or raises one of our typed errors (one
line naming the file), within a time limit and without allocating what the header claims."""

from __future__ import annotations

import math
import struct
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fuzz_readers import check_one_line

from mlxllama.errors import WeightsError

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])
MEMORY = 64 << 20  # bytes any single case may allocate (traced), whatever its header claims

# -- a GGUF encoder that can also lie ------------------------------------------------------------
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q",
        I64: "<q", F64: "<d"}
ABSURD = [2**60, 2**63, 2**64 - 1, 10**15, 2**32 - 1, 2**32]


def string(s: str | bytes, claimed: int | None = None) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b) if claimed is None else claimed) + b


def value(vtype: int, v) -> bytes:
    """Honest encoding of v as vtype (arrays: v = (item type, [items]))."""
    if vtype == STR:
        return string(v)
    if vtype == ARR:
        itype, items = v
        return struct.pack("<IQ", itype, len(items)) + b"".join(value(itype, x) for x in items)
    return struct.pack(_FMT[vtype], v)


def typed(v) -> tuple[int, bytes]:
    """Python value -> (GGUF type, payload), picking the type llama.cpp's writer would."""
    if isinstance(v, bool):
        return BOOL, value(BOOL, v)
    if isinstance(v, int):
        return (I32, value(I32, v)) if -2**31 <= v < 2**31 else (U64, value(U64, v % 2**64))
    if isinstance(v, float):
        return (F32, value(F32, v)) if not math.isfinite(v) or abs(v) < 3e38 else (F64, value(F64, v))
    if isinstance(v, str):
        return STR, value(STR, v)
    items = [typed(x) for x in v]
    itype = items[0][0] if items and len({t for t, _ in items}) == 1 else STR
    if any(t != itype for t, _ in items):
        items = [typed(str(x)) for x in v]
    return ARR, struct.pack("<IQ", itype, len(items)) + b"".join(p for _, p in items)


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return string(key) + struct.pack("<I", vtype) + payload


def tensor_info(name: str, dims: list[int], ggml_type: int, offset: int, n_dims: int | None = None) -> bytes:
    return (string(name) + struct.pack("<I", len(dims) if n_dims is None else n_dims)
            + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ggml_type, offset))


def gguf_bytes(kvs: list[bytes], infos: list[bytes], data: bytes = b"", version: int = 3,
               n_kv: int | None = None, n_tensors: int | None = None, alignment: int = 32) -> bytes:
    head = (b"GGUF" + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                                  len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(infos))
    return head + b"\0" * (-len(head) % alignment) + data


# -- a tiny valid llama, F32, every tensor encoded by hand ---------------------------------------
HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 32, 64, 2, 1, 8
TOKENS = ["<s>", "</s>", "a", "b", "c", "ab", "bc", "abc"]


def tiny_metadata() -> dict:
    return {"general.architecture": "llama", "general.alignment": 32, "llama.block_count": 1,
            "llama.context_length": 128, "llama.embedding_length": HIDDEN, "llama.feed_forward_length": FFN,
            "llama.attention.head_count": HEADS, "llama.attention.head_count_kv": KV_HEADS,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.freq_base": 10000.0,
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": TOKENS,
            "tokenizer.ggml.token_type": [3, 3, 1, 1, 1, 1, 1, 1], "tokenizer.ggml.merges": ["a b", "b c", "a bc"],
            "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1,
            "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}


def tiny_tensors() -> dict[str, tuple[int, ...]]:
    hd = HIDDEN // HEADS
    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,)}
    p = "blk.0."
    shapes.update({p + "attn_norm.weight": (HIDDEN,), p + "ffn_norm.weight": (HIDDEN,),
                   p + "attn_q.weight": (HEADS * hd, HIDDEN), p + "attn_k.weight": (KV_HEADS * hd, HIDDEN),
                   p + "attn_v.weight": (KV_HEADS * hd, HIDDEN), p + "attn_output.weight": (HIDDEN, HEADS * hd),
                   p + "ffn_gate.weight": (FFN, HIDDEN), p + "ffn_up.weight": (FFN, HIDDEN),
                   p + "ffn_down.weight": (HIDDEN, FFN)})
    return shapes


def tiny_gguf(metadata: dict | None = None, raw_kvs: list[bytes] = (), types: dict[str, int] | None = None,
              fill: bytes | None = None) -> bytes:
    """The tiny llama, F32 unless `types` gives a tensor another GGML type (its bytes then `fill`, repeated)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    md = tiny_metadata() if metadata is None else metadata
    kvs = [kv(k, *typed(v)) for k, v in md.items()] + list(raw_kvs)
    infos, data = [], b""
    for name, shape in tiny_tensors().items():
        ttype = (types or {}).get(name, 0)
        infos.append(tensor_info(name, list(reversed(shape)), ttype, len(data)))
        if ttype == 0:
            data += np.full(shape, 0.01, np.float32).tobytes()
        else:
            per, size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            n = math.prod(shape) // per * size if shape[-1] % per == 0 else 64
            data += (fill * (n // len(fill) + 1))[:n]
        data += b"\0" * (-len(data) % 32)
    return gguf_bytes(kvs, infos, data)


def read(path):
    from mlxllama.convert.gguf_reader import GGUFFile

    g = GGUFFile(path)
    for t in g.tensors:
        g.data(t)
    return g


def open_and_build(path):
    """What `mlxllama convert FILE.gguf` does with a file: the header, config, tokenizer and every tensor."""
    from mlxllama.convert.gguf import open_gguf
    from mlxllama.convert.gguf_tokenizer import build_tokenizer

    source = open_gguf(path)
    build_tokenizer(source.gguf_metadata, path)
    for t in source.tensors:
        t.fetch()


def test_the_tiny_file_is_valid(tmp_path):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(tiny_gguf())
    open_and_build(path)


# -- strategies ----------------------------------------------------------------------------------
lengths = st.sampled_from(ABSURD) | st.integers(0, 300)
scalars = st.sampled_from(sorted(_FMT)).flatmap(lambda t: st.tuples(st.just(t), st.binary(
    min_size=struct.calcsize(_FMT[t]), max_size=struct.calcsize(_FMT[t]))))
lying_strings = st.tuples(st.binary(max_size=12), st.none() | lengths).map(lambda a: (STR, string(*a)))
unknown = st.tuples(st.integers(13, 2**32 - 1), st.binary(max_size=16))


def _arrays(inner):
    def encode(itype, items, claimed):
        return ARR, struct.pack("<IQ", itype, len(items) if claimed is None else claimed) + b"".join(
            p for _, p in items)
    return st.tuples(st.sampled_from([*_FMT, STR, ARR, 13, 99, 2**32 - 1]), st.lists(inner, max_size=4),
                     st.none() | lengths).map(lambda a: encode(*a))


values = st.recursive(scalars | lying_strings | unknown, _arrays, max_leaves=12)
keys = st.binary(max_size=20) | st.sampled_from(list(tiny_metadata()))
ggml_types = st.integers(0, 45) | st.sampled_from([2**31, 2**32 - 1])
dims = st.sampled_from([0, 1, 32, 256, 10**15, 2**63, 2**64 - 1]) | st.integers(1, 4096)
offsets = st.sampled_from([0, 32, 64, 2**63, 2**64 - 1]) | st.integers(0, 1 << 16)
infos = st.tuples(st.text(max_size=12), st.lists(dims, max_size=5), ggml_types, offsets,
                  st.none() | st.sampled_from([0, 5, 2**32 - 1])).map(lambda a: tensor_info(*a))


def guarded(tmp_path, blob: bytes, fn=read, **limits) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(blob)
    check_one_line(fn, path, memory=MEMORY, **limits)


# -- properties ----------------------------------------------------------------------------------

@FUZZ
@given(st.binary(max_size=400), st.sampled_from([2, 3, 1, 4, 2**32 - 1]))
def test_random_bytes_after_the_magic(tmp_path, blob, version):
    guarded(tmp_path, b"GGUF" + struct.pack("<I", version) + blob)


@FUZZ
@given(st.lists(st.tuples(keys, values), max_size=6), st.none() | st.sampled_from(ABSURD + [7]),
       st.none() | st.sampled_from(ABSURD + [3]), st.integers(0, 2048))
def test_metadata_tables(tmp_path, entries, n_kv, n_tensors, data):
    """Strings of 2^60 bytes, arrays of 2^64-1 items, unknown value types, nested arrays, lying counts."""
    kvs = [string(k) + struct.pack("<I", t) + p for k, (t, p) in entries]
    guarded(tmp_path, gguf_bytes(kvs, [], b"\0" * data, n_kv=n_kv, n_tensors=n_tensors))


@FUZZ
@given(st.lists(infos, max_size=5), st.integers(0, 4096), st.sampled_from([None, 1, 3, 32, 33, 2**31]))
def test_tensor_tables(tmp_path, table, data, alignment):
    """Dims of 10^15 and 2^64-1, offsets past the end, overlapping tensors, unknown GGML types."""
    kvs = [] if alignment is None else [kv("general.alignment", U32, value(U32, alignment))]
    guarded(tmp_path, gguf_bytes(kvs, table, b"\1" * data))


@FUZZ
@given(st.data())
def test_truncated_or_corrupted_anywhere(tmp_path, data):
    """One byte of a valid file changed, or the file cut, anywhere: reading it fails cleanly or succeeds."""
    blob = bytearray(tiny_gguf())
    if data.draw(st.booleans()):
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    else:
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at] = data.draw(st.integers(0, 255))
    guarded(tmp_path, bytes(blob), open_and_build)


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted(tiny_tensors())), st.sampled_from(
    [t.value for t in __import__("gguf").GGMLQuantizationType]), min_size=1, max_size=4),
    st.binary(min_size=1, max_size=64))
def test_tensor_types_with_random_blocks(tmp_path, types, fill):
    """Any GGML type for any tensor, with random block bytes (NaN and infinite scales included)."""
    guarded(tmp_path, tiny_gguf(types=types, fill=fill), open_and_build)


def test_truncation_at_every_byte_of_the_header_is_refused(tmp_path):
    """Every cut of a valid file, through the whole header and at steps through the data, is refused."""
    from mlxllama.convert.gguf_reader import GGUFFile

    blob = tiny_gguf()
    header_end = min(t.offset for t in GGUFFile(_write(tmp_path, blob)).tensors)
    cuts = [*range(header_end), *range(header_end, len(blob), 331)]
    for cut in cuts:
        path = _write(tmp_path, blob[:cut])
        with pytest.raises(WeightsError) as e:
            GGUFFile(path)
        assert "\n" not in str(e.value) and path.name in str(e.value), str(e.value)
    assert len(cuts) > 500


def _write(tmp_path, blob):
    path = tmp_path / "cut.gguf"
    path.write_bytes(blob)
    return path


hostile = (st.integers(-2**63, 2**64 - 1) | st.sampled_from([0, -1, 10**9, 10**15]) | st.floats()
           | st.text(max_size=8) | st.booleans() | st.lists(st.integers(-5, 10**6), max_size=3)
           | st.lists(st.text(max_size=4), max_size=3))


READ_KEYS = sorted({*tiny_metadata(), "tokenizer.ggml.scores", "tokenizer.ggml.unknown_token_id",
                    "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
                    "tokenizer.ggml.add_space_prefix", "llama.rope.scaling.type", "llama.rope.scaling.factor",
                    "llama.attention.key_length", "llama.vocab_size"})


@FUZZ
@given(st.dictionaries(st.sampled_from(READ_KEYS), hostile | st.sampled_from(["llama", "gpt2", "linear", "qwen2"])
                       | st.lists(st.floats(), min_size=8, max_size=8), max_size=4),
       st.sets(st.sampled_from(sorted(tiny_metadata())), max_size=3))
def test_hostile_metadata_values(tmp_path, changes, dropped):
    """The keys the converter reads, with wrong types, absurd sizes (block_count 10^9) or missing."""
    md = {k: v for k, v in tiny_metadata().items() if k not in dropped}
    md.update(changes)
    guarded(tmp_path, tiny_gguf(md), open_and_build)


def test_duplicate_keys_and_tensors_are_refused(tmp_path):
    path = _write(tmp_path, tiny_gguf(raw_kvs=[kv("llama.block_count", U32, value(U32, 2))]))
    with pytest.raises(WeightsError, match="duplicate"):
        read(path)
    info = tensor_info("w", [32], 0, 0)
    path = _write(tmp_path, gguf_bytes([], [info, info], b"\0" * 256))
    with pytest.raises(WeightsError, match="duplicate"):
        read(path)


def test_overlapping_tensors_are_refused(tmp_path):
    path = _write(tmp_path, gguf_bytes([], [tensor_info("a", [32], 0, 0), tensor_info("b", [32], 0, 128)],
                                       b"\0" * 512))
    read(path)
    path = _write(tmp_path, gguf_bytes([], [tensor_info("a", [32], 0, 0), tensor_info("b", [32], 0, 64)],
                                       b"\0" * 512))
    with pytest.raises(WeightsError, match="overlap"):
        read(path)


def test_deeply_nested_arrays_are_refused(tmp_path):
    payload = struct.pack("<IQ", ARR, 1) * 100_000 + struct.pack("<IQ", I32, 0)
    path = _write(tmp_path, gguf_bytes([kv("x", ARR, payload)], []))
    with pytest.raises(WeightsError, match="nest"):
        read(path)


@pytest.mark.parametrize("change, message", [
    ({"llama.block_count": 10**9}, "claims 1000000000 blocks"),          # built a table of 10^9 layers (hang)
    ({"general.architecture": ["llama"]}, "architecture"),               # TypeError: unhashable list
    ({"tokenizer.ggml.token_type": ["a"]}, "token_type must be an array of numbers"),  # AttributeError
    ({"tokenizer.ggml.merges": ["ab"]}, "merge is not two tokens"),       # TypeError from tokenizers
    ({"tokenizer.ggml.add_bos_token": [1, 2]}, "must be a boolean"),      # ValueError: truth of an array
    ({"llama.embedding_length": "32"}, "must be an integer"),
    ({"llama.rope.freq_base": float("nan")}, "finite"),
    ({"llama.attention.key_length": 15}, "odd"),
    ({"general.alignment": [0.0] * 7 + [1000.0]}, "alignment must be a power of two"),  # numpy's repr: 2 lines
])
def test_what_fuzzing_found(tmp_path, change, message):
    from mlxllama.errors import MlxllamaError

    md = tiny_metadata()
    md.update(change)
    path = _write(tmp_path, tiny_gguf(md))
    with pytest.raises(MlxllamaError, match=message) as e:
        open_and_build(path)
    assert path.name in str(e.value)


def test_the_guard_catches_a_huge_allocation_and_a_hang(tmp_path):
    from test_fuzz_readers import Hang

    def allocates(path):
        return np.ones(100 << 20, np.uint8)

    def hangs(path):
        while True:
            time.sleep(0.01)

    with pytest.raises(AssertionError, match="allocated"):
        guarded(tmp_path, b"", allocates)
    with pytest.raises(Hang):
        guarded(tmp_path, b"", hangs, limit=0.5)


def test_the_cli_answers_a_hostile_file_with_one_line(tmp_path):
    import subprocess
    import sys

    md = tiny_metadata()
    md["llama.block_count"] = 10**9
    path = _write(tmp_path, tiny_gguf(md))
    r = subprocess.run([sys.executable, "-m", "mlxllama", "convert", str(path), "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120, check=False)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]] and path.name in lines[-1], lines
    assert not (tmp_path / "out").exists()
