"""Loading model folders, and every way a folder can be wrong."""

import json
import os

import mlx.core as mx
import pytest

import mlxllama
from mlxllama.errors import ConfigError, ModelNotFoundError, UnsupportedModelError, WeightsError
from mlxllama.resolve import resolve_model
from mlxllama.loader import load_model
from tinymodels import write_model


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            config.pop(k, None)
        else:
            config[k] = v
    (path / "config.json").write_text(json.dumps(config))


def test_load_returns_model_and_tokenizer(tmp_path):
    write_model(tmp_path)
    model, tokenizer = mlxllama.load(tmp_path)
    assert model(mx.array([tokenizer.encode("hello")])).shape[-1] == 300
    assert model.layers[0].mlp.down_proj.weight.dtype == mx.float32  # CPU computes in float32


def test_dtype_override(tmp_path):
    write_model(tmp_path, tokenizer=False)
    model, _ = load_model(tmp_path, dtype="bfloat16")
    assert model.layers[0].mlp.up_proj.weight.dtype == mx.bfloat16


def test_sharded_checkpoint_with_index(tmp_path):
    write_model(tmp_path, tokenizer=False)
    weights = mx.load(str(tmp_path / "model.safetensors"))
    os.remove(tmp_path / "model.safetensors")
    keys = sorted(weights)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        mx.save_safetensors(str(tmp_path / name), {k: weights[k] for k in ks})
    index = {"weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    load_model(tmp_path)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(WeightsError, match="model-00002-of-00002.safetensors"):
        load_model(tmp_path)


def test_missing_folder():
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model("/definitely/not/here")


def test_repo_id_offline_fails_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="some-org/some-model") as e:
        resolve_model("some-org/some-model")
    assert "\n" not in str(e.value)


def test_missing_config(tmp_path):
    write_model(tmp_path, tokenizer=False)
    os.remove(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="config.json"):
        load_model(tmp_path)


def test_config_missing_required_key(tmp_path):
    write_model(tmp_path, tokenizer=False)
    edit_config(tmp_path, hidden_size=None)
    with pytest.raises(ConfigError, match="hidden_size"):
        load_model(tmp_path)


def test_config_not_json(tmp_path):
    write_model(tmp_path, tokenizer=False)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(tmp_path)


def test_unknown_model_type(tmp_path):
    write_model(tmp_path, tokenizer=False)
    edit_config(tmp_path, model_type="definitely_not_a_model")
    with pytest.raises(UnsupportedModelError, match="llama"):
        load_model(tmp_path)


def test_weights_disagree_with_config(tmp_path):
    write_model(tmp_path, tokenizer=False)
    edit_config(tmp_path, intermediate_size=96)
    with pytest.raises(WeightsError, match="mlp"):
        load_model(tmp_path)


def test_missing_weight_is_named(tmp_path):
    write_model(tmp_path, tokenizer=False)
    weights = mx.load(str(tmp_path / "model.safetensors"))
    del weights["model.layers.1.self_attn.k_proj.weight"]
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    with pytest.raises(WeightsError, match="model.layers.1.self_attn.k_proj.weight"):
        load_model(tmp_path)


def test_truncated_safetensors(tmp_path):
    write_model(tmp_path, tokenizer=False)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="model.safetensors"):
        load_model(tmp_path)


def test_no_weights(tmp_path):
    write_model(tmp_path, tokenizer=False)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match="safetensors"):
        load_model(tmp_path)


def test_fallback_zoo_loads_other_architectures(tmp_path):
    """A model type outside the Llama family (qwen3 here) loads through mlx-lm's model modules."""
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    config = {"model_type": "qwen3", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-6,
              "vocab_size": 300, "max_position_embeddings": 256, "rope_theta": 10000.0,
              "tie_word_embeddings": True}
    model_class, args_class = _get_classes(config)
    theirs = model_class(args_class.from_dict(config))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(theirs.parameters())))
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours, _ = load_model(tmp_path)
    tokens = mx.array([[1, 2, 3, 4, 5]])
    np.testing.assert_allclose(np.array(ours(tokens)), np.array(theirs(tokens)), atol=1e-5)
    steps = list(mlxllama.generate_step(mx.array([1, 2, 3]), ours, max_tokens=3))  # mlx-lm's caches
    assert len(steps) == 3
