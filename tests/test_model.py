"""The transformer: parity with mlx-lm's llama, cache decoding, batches with left padding."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxllama.generate import padding_mask
from mlxllama.loader import load_model
from mlxllama.models import KVCache, RotatingKVCache
from tinymodels import CONFIGS, make_model, write_model

TOKENS = mx.array([[3, 17, 42, 7, 99, 250, 11, 5, 64, 128]], dtype=mx.int32)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_mlx_lm(tmp_path, name):
    from mlx_lm.utils import load_model as mlx_lm_load

    write_model(tmp_path, name, tokenizer=False)
    ours, _ = load_model(tmp_path)
    theirs, _ = mlx_lm_load(tmp_path)
    a, b = np.array(ours(TOKENS)), np.array(theirs(TOKENS))
    assert a.shape == (1, TOKENS.shape[1], 300)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    assert np.abs(a).max() > 0.1  # not a degenerate model


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 64), (3, 32)])
def test_quantized_checkpoint_matches_mlx_lm(tmp_path, bits, group):
    from mlx_lm.utils import load_model as mlx_lm_load

    write_model(tmp_path, "untied", quantize={"group_size": group, "bits": bits}, tokenizer=False)
    quantized, _ = load_model(tmp_path, dense=False)
    dense, _ = load_model(tmp_path, dense=True)
    theirs, _ = mlx_lm_load(tmp_path)
    ref = np.array(theirs(TOKENS))
    np.testing.assert_allclose(np.array(quantized(TOKENS)), ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.array(dense(TOKENS)), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["gqa_tied", "qwen2_bias", "llama3_rope"])
def test_cached_decoding_equals_full_forward(name):
    model, _ = make_model(name)
    full = model(TOKENS)  # (1, L, V)
    cache = model.make_cache()
    steps = [model(TOKENS[:, :4], cache=cache)]  # a prefill chunk, then one token at a time
    for i in range(4, TOKENS.shape[1]):
        steps.append(model(TOKENS[:, i : i + 1], cache=cache))
    np.testing.assert_allclose(np.array(mx.concatenate(steps, axis=1)), np.array(full), atol=1e-5)
    assert cache[0].offset == TOKENS.shape[1]


def test_batch_with_left_padding_equals_each_alone():
    model, _ = make_model("gqa_tied")
    prompts = [[5, 9, 13, 200, 7], [8, 1], [40, 41, 42]]
    longest = max(map(len, prompts))
    pad = mx.array([longest - len(p) for p in prompts])
    batch = mx.array([[0] * (longest - len(p)) + p for p in prompts], dtype=mx.int32)
    cache = model.make_cache()
    logits = model(batch, cache=cache, mask=padding_mask(pad, 0, longest))[:, -1]
    nxt = mx.argmax(logits, axis=-1)
    logits2 = model(nxt[:, None], cache=cache, mask=padding_mask(pad, longest, 1))[:, -1]
    for b, p in enumerate(prompts):
        c = model.make_cache()
        alone = model(mx.array([p]), cache=c)[:, -1]
        np.testing.assert_allclose(np.array(logits[b]), np.array(alone[0]), atol=1e-4)
        alone2 = model(nxt[b : b + 1, None], cache=c)[:, -1]
        np.testing.assert_allclose(np.array(logits2[b]), np.array(alone2[0]), atol=1e-4)


def test_kv_cache_grows_in_chunks_and_trims():
    cache = KVCache()
    for i in range(300):
        k = mx.full((1, 2, 1, 4), float(i))
        keys, _ = cache.update_and_fetch(k, k)
    assert keys.shape[2] == 300 and cache.keys.shape[2] == 512  # two chunks of 256, not 300 concatenates
    assert cache.trim(10) == 10 and cache.offset == 290
    keys, _ = cache.update_and_fetch(mx.full((1, 2, 1, 4), -1.0), mx.full((1, 2, 1, 4), -1.0))
    assert keys.shape[2] == 291 and keys[0, 0, -1, 0].item() == -1 and keys[0, 0, -2, 0].item() == 289


def test_rotating_cache_keeps_sinks_and_recent():
    cache = RotatingKVCache(max_size=8, keep=2)
    cache.update_and_fetch(*(mx.arange(5, dtype=mx.float32).reshape(1, 1, 5, 1),) * 2)  # prefill 0..4
    for i in range(5, 20):
        k = mx.full((1, 1, 1, 1), float(i))
        keys, _ = cache.update_and_fetch(k, k)
    assert keys.shape[2] == 8
    assert sorted(np.array(keys).ravel().tolist()) == [0, 1, 14, 15, 16, 17, 18, 19]
    assert cache.offset == 20


def test_rotating_cache_generation_runs_past_its_size():
    model, _ = make_model("gqa_tied")
    cache = model.make_cache(max_kv_size=16)
    model(mx.array([list(range(1, 30))]), cache=cache)
    for t in range(40):
        out = model(mx.array([[t + 1]]), cache=cache)
    assert np.isfinite(np.array(out)).all() and cache[0].offset == 69


def test_model_args_ignore_unknown_keys():
    model, config = make_model("gqa_tied", some_future_key=123)
    assert model.args.extra["some_future_key"] == 123
    assert len(tree_flatten(model.parameters())) > 0


# --- fused projections and the CPU rotary table ----------------------------------------------

def all_weights(model) -> dict:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "quantized"])
def test_fused_projections_give_the_same_logits_and_unfuse_exactly(tmp_path, name, quantized):
    quant = {"group_size": 32, "bits": 4} if quantized else None
    write_model(tmp_path, name, quantize=quant, tokenizer=False)
    plain, _ = load_model(tmp_path, dense=False)
    fused, _ = load_model(tmp_path, dense=False, stack=True)
    attn, mlp = fused.layers[0].self_attn, fused.layers[0].mlp
    assert "qkv_proj" in attn and "q_proj" not in attn and "gate_up_proj" in mlp and "up_proj" not in mlp
    np.testing.assert_allclose(np.array(fused(TOKENS)), np.array(plain(TOKENS)), atol=1e-5, rtol=1e-5)
    cache_a, cache_b = plain.make_cache(), fused.make_cache()  # the decode path too
    for i in range(TOKENS.shape[1]):
        a, b = plain(TOKENS[:, i : i + 1], cache=cache_a), fused(TOKENS[:, i : i + 1], cache=cache_b)
        np.testing.assert_allclose(np.array(b), np.array(a), atol=1e-5, rtol=1e-5)
    fused.unstack_projections()
    want, got = all_weights(plain), all_weights(fused)
    assert sorted(got) == sorted(want)
    for k in want:
        assert np.array_equal(got[k], want[k]), k


def test_fusion_leaves_groups_it_cannot_stack(tmp_path):
    """A LoRA-wrapped projection or differently quantized q/k/v stay as they are; the rest fuse."""
    import mlx.nn as nn

    from mlxllama.lora.layers import LoRALinear

    model, _ = make_model("gqa_tied")
    ref = np.array(model(TOKENS))
    model.layers[0].self_attn.q_proj = LoRALinear(model.layers[0].self_attn.q_proj, rank=2)
    v = model.layers[1].self_attn.v_proj
    model.layers[1].self_attn.v_proj = nn.QuantizedLinear.from_linear(v, group_size=32, bits=8)
    ref_mixed = np.array(model(TOKENS))
    assert model.stack_projections() == 2 * 2 - 2  # both MLPs; neither attention
    assert "q_proj" in model.layers[0].self_attn and "qkv_proj" not in model.layers[1].self_attn
    np.testing.assert_allclose(np.array(model(TOKENS)), ref_mixed, atol=1e-5)
    assert np.abs(ref_mixed - ref).max() > 0  # the 8-bit v really is a different model


@pytest.mark.parametrize("name", ["gqa_tied", "llama3_rope", "linear_rope_head_dim"])
def test_rope_table_equals_fast_rope(name):
    """The CPU rows rotate as mx.fast.rope does, near and far positions alike."""
    from mlxllama.models.host_ops import RopeTable, apply_rope_table

    model, config = make_model(name)
    args, rope = model.args, model.layers[0].self_attn.rope
    table = RopeTable.for_args(args)
    x = mx.random.normal((2, 5, 3, args.head_dim))  # (B, L, heads, Dh)
    for offset in (0, 17, 4093, 100_000):
        cos, sin = table(offset, 5, mx.float32)
        got = apply_rope_table(x, cos, sin)
        want = rope(x.transpose(0, 2, 1, 3), offset=offset).transpose(0, 2, 1, 3)
        # fast.rope takes float32 angles, the table float64 ones: equal up to float32 angle rounding
        tol = 1e-5 if offset < 1000 else 2e-3 if offset < 10_000 else 5e-2
        np.testing.assert_allclose(np.array(got), np.array(want), atol=tol)


def test_llama3_rope_runs_on_a_thread_other_than_the_loading_one(tmp_path):
    """The serving engine runs the model on its own thread: nothing lazy may be left from loading
    (the llama3 frequencies were), or MLX fails with "no Stream(cpu, 0) in current thread"."""
    import threading

    write_model(tmp_path, "llama3_rope", tokenizer=False)
    model, _ = load_model(tmp_path, stack=True)
    x = mx.random.normal((2, 4, 3, model.args.head_dim))
    mx.eval(x)
    errors, out = [], []

    def work():
        try:
            rope = model.layers[0].self_attn.rope  # array offsets (serve's rows) take mx.fast.rope
            out.append(np.array(rope(x, offset=mx.array([0, 3]))))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            if hasattr(mx, "clear_streams"):
                mx.clear_streams()

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert not errors and out[0].shape == (2, 4, 3, model.args.head_dim), errors


def test_traditional_rope_uses_the_fast_kernel():
    from mlxllama.models.llama import RopeTable

    model, _ = make_model("gqa_tied", rope_traditional=True)
    assert RopeTable.for_args(model.args) is None
    cache = model.make_cache()
    steps = [model(TOKENS[:, :4], cache=cache)] + [model(TOKENS[:, i : i + 1], cache=cache) for i in range(4, 10)]
    np.testing.assert_allclose(np.array(mx.concatenate(steps, axis=1)), np.array(model(TOKENS)), atol=1e-5)


@pytest.mark.parametrize("name", ["gqa_tied", "qwen2_bias", "llama3_rope"])
def test_fused_model_on_the_fast_rope_path(name):
    """The GPU path (mx.fast.rope on the stacked q and k) gives the CPU path's logits."""
    from mlxllama.models.backend import Backend, CPUBackend

    assert isinstance(make_model(name)[0].backend, CPUBackend)  # chosen for the device when built
    model, _ = make_model(name)
    want = [np.array(model(TOKENS))]
    cache = model.make_cache()
    want.append(np.array(mx.concatenate([model(TOKENS[:, :6], cache=cache), model(TOKENS[:, 6:7], cache=cache)], 1)))
    model.stack_projections()
    model.use_backend(Backend())  # plain MLX, as on a GPU
    cache = model.make_cache()
    got = [np.array(model(TOKENS)),
           np.array(mx.concatenate([model(TOKENS[:, :6], cache=cache), model(TOKENS[:, 6:7], cache=cache)], 1))]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-4)


def test_old_stacking_names_still_work_with_a_warning(tmp_path):
    import warnings

    from mlxllama.loader import load_model

    write_model(tmp_path, "gqa_tied")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model, _ = load_model(tmp_path, fuse=True)
    assert "qkv_proj" in model.layers[0].self_attn and any("stack=" in str(x.message) for x in w)
    model, _ = load_model(tmp_path)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert model.fuse_projections() > 0
    assert any("stack_projections" in str(x.message) for x in w)
