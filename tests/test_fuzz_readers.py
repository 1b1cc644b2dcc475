"""Property-based fuzzing of the readers of user files: whatever the bytes, the reader either
returns or raises one of our typed errors (one line, naming the file), quickly, without allocating
what a hostile header claims."""

from __future__ import annotations

import json
import signal
import struct
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlxllama.errors import MlxllamaError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FAST = 5.0  # seconds any single case may take

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20)


class Hang(Exception):
    pass


def _hang(signum, frame):
    raise Hang("a case took too long")


def check_one_line(fn, path: Path, memory: int | None = None, limit: float = FAST) -> None:
    """Runs a reader: success, or a typed error whose message is one line naming the file, within `limit`
    seconds (a timer interrupts a hang) and, with `memory`, allocating at most that many bytes (traced)."""
    previous = signal.signal(signal.SIGALRM, _hang)
    signal.setitimer(signal.ITIMER_REAL, limit)
    if memory is not None:
        tracemalloc.start()
    try:
        fn(path)
    except MlxllamaError as e:
        message = str(e)
        assert "\n" not in message.strip(), message
        assert path.name in message or str(path.parent) in message, message
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if memory is not None:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak < memory, f"a case allocated {peak} bytes"


# -- safetensors headers ------------------------------------------------------------------------

def safetensors_bytes(header: bytes, claimed: int | None = None, data: bytes = b"") -> bytes:
    n = len(header) if claimed is None else claimed
    return struct.pack("<Q", n) + header + data


@FUZZ
@given(st.binary(max_size=300))
def test_safetensors_random_bytes(tmp_path, blob):
    from mlxllama.convert.safetensors_header import read_header

    path = tmp_path / "model.safetensors"
    path.write_bytes(blob)
    check_one_line(read_header, path)


@FUZZ
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=4), st.binary(max_size=64))
def test_safetensors_random_json_headers(tmp_path, header, data):
    from mlxllama.convert.safetensors_header import read_header

    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes(json.dumps(header).encode(), data=data))
    check_one_line(read_header, path)


@FUZZ
@given(st.lists(st.integers(0, 10**9), min_size=1, max_size=4), st.integers(0, 2**62), st.integers(0, 2**62),
       st.sampled_from(["F32", "F16", "BF16", "U32", "I8", "XX"]))
def test_safetensors_shapes_and_offsets_must_agree(tmp_path, shape, begin, end, dtype):
    """A header claiming 10^15 elements or offsets far past the file is refused before anything is allocated."""
    from mlxllama.convert.safetensors_header import read_header

    header = {"w": {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}}
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes(json.dumps(header).encode(), data=b"\0" * 16))
    check_one_line(read_header, path)


def test_safetensors_header_length_of_2_to_the_60_is_refused(tmp_path):
    from mlxllama.convert.safetensors_header import read_header
    from mlxllama.errors import WeightsError

    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes(b"{}", claimed=2**60))
    with pytest.raises(WeightsError, match="model.safetensors"):
        read_header(path)


def test_a_shape_that_disagrees_with_the_offsets_is_refused(tmp_path):
    from mlxllama.convert.safetensors_header import read_header
    from mlxllama.errors import WeightsError

    header = {"w": {"dtype": "F32", "shape": [10**8, 10**7], "data_offsets": [0, 16]}}
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes(json.dumps(header).encode(), data=b"\0" * 16))
    with pytest.raises(WeightsError, match="shape"):
        read_header(path)


# -- config.json and the model folder -----------------------------------------------------------

@FUZZ
@given(json_values)
def test_config_json_any_value(tmp_path, value):
    from mlxllama.loader import load_model

    (tmp_path / "config.json").write_text(json.dumps(value))
    check_one_line(lambda p: load_model(p.parent), tmp_path / "config.json")


@FUZZ
@given(st.fixed_dictionaries({"model_type": st.sampled_from(["llama", "mistral", "qwen2"])},
                             optional={k: json_values | st.integers(-5, 10**12) for k in
                                       ["hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                                        "num_key_value_heads", "vocab_size", "rms_norm_eps", "head_dim",
                                        "rope_scaling", "quantization", "tie_word_embeddings"]}))
def test_config_json_llama_fields(tmp_path, config):
    """Hostile sizes (10^12 hidden units) fail on the missing or mismatched weights, never by allocating them."""
    from mlxllama.loader import load_model

    (tmp_path / "config.json").write_text(json.dumps(config))
    check_one_line(lambda p: load_model(p.parent, lazy=True), tmp_path / "config.json")


# -- tokenizer files ----------------------------------------------------------------------------

@FUZZ
@given(st.sampled_from(["tokenizer.json", "tokenizer_config.json"]), st.binary(max_size=200) | json_values.map(
    lambda v: json.dumps(v).encode()))
def test_tokenizer_files(tmp_path, name, blob):
    from tinymodels import write_tokenizer

    from mlxllama.tokenizer import load_tokenizer

    write_tokenizer(tmp_path)
    (tmp_path / name).write_bytes(blob)
    check_one_line(load_tokenizer, tmp_path / name)


# -- LoRA data and YAML configs -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tinymodels import write_tokenizer

    from mlxllama.tokenizer import load_tokenizer

    path = tmp_path_factory.mktemp("tok")
    write_tokenizer(path)
    return load_tokenizer(path)


@FUZZ
@given(st.lists(st.binary(max_size=60) | json_values.map(lambda v: json.dumps(v).encode()), max_size=6))
def test_lora_jsonl(tmp_path, tokenizer, lines):
    from mlxllama.lora.data import load_dataset

    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
    check_one_line(lambda p: load_dataset(p, tokenizer, True, 64), path)


@FUZZ
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_lora_yaml(tmp_path, blob):
    from mlxllama.lora.config import make_config

    path = tmp_path / "lora.yaml"
    path.write_bytes(blob)
    check_one_line(make_config, path)
