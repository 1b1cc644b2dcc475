"""The fused CPU decode (mlxllama.kernels.decode_layers): the model's blocks for one token as native
operations, against the same model run operation by operation."""

import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlxllama import kernels
from mlxllama.kernels import _qmm
from mlxllama.loader import load_model
from mlxllama.models import backend
from mlxllama.models.cache import KVCache
from tinymodels import write_model

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"extension not built: {kernels.why_missing()}")


def decode(model, prompt, steps, fused=True, monkeypatch=None, cache=None):
    """Greedy decode; returns (logits per step (steps, V), cache)."""
    if not fused:
        monkeypatch.setattr(backend.CPUBackend, "layers", lambda *a: None)
    cache = cache if cache is not None else model.make_cache()
    logits = model(mx.array([prompt]), cache=cache)[:, -1]
    out = []
    for _ in range(steps):
        t = mx.argmax(logits, axis=-1)
        logits = model(t[:, None], cache=cache)[:, -1]
        out.append(np.array(logits[0]))
    if not fused:
        monkeypatch.undo()
    return np.stack(out), cache


def spy_fused(monkeypatch) -> list:
    """Replaces kernels.decode_layers by a spy; the list gets, per call, whether the fused path ran."""
    calls = []
    real = kernels.decode_layers

    def spy(*a):
        out = real(*a)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(kernels, "decode_layers", spy)
    return calls


def uses_fused(model, monkeypatch) -> bool:
    calls = spy_fused(monkeypatch)
    decode(model, [1, 2, 3], 1)
    monkeypatch.undo()
    return calls == [True]


WIDE = {"hidden_size": 128, "intermediate_size": 256}


@pytest.mark.parametrize("name,quant,extra", [
    ("gqa_tied", {"group_size": 32, "bits": 4}, {}),
    ("gqa_tied", {"group_size": 64, "bits": 8}, {}),
    ("llama3_rope", {"group_size": 128, "bits": 4}, WIDE),
    ("linear_rope_head_dim", {"group_size": 64, "bits": 2}, {}),
    ("untied", {"group_size": 32, "bits": 4}, {}),
])
def test_fused_decode_matches_op_by_op(tmp_path, monkeypatch, name, quant, extra):
    """Through a cache growth (256 positions) and past the size where attention is split over threads."""
    path = write_model(tmp_path / name, name, quantize=quant, num_hidden_layers=3, **extra)
    model, _ = load_model(path, stack=True)
    assert model.weights_form == "kernel" and uses_fused(model, monkeypatch)
    prompt = list(range(1, 250))
    fused, c1 = decode(model, prompt, 20)
    plain, c2 = decode(model, prompt, 20, fused=False, monkeypatch=monkeypatch)
    scale = np.abs(plain).max()
    assert np.abs(fused - plain).max() <= 1e-4 * scale, name
    assert (fused.argmax(-1) == plain.argmax(-1)).all()
    for a, b in zip(c1, c2):
        assert a.offset == b.offset == len(prompt) + 20
        assert np.allclose(np.array(a.state[0]), np.array(b.state[0]), atol=1e-4 * scale)
        assert np.allclose(np.array(a.state[1]), np.array(b.state[1]), atol=1e-4 * scale)


def test_cache_buffers_are_written_in_place_unless_shared(tmp_path):
    model, _ = load_model(write_model(tmp_path / "m", quantize={"group_size": 32, "bits": 4}), stack=True)
    cache = model.make_cache()
    decode(model, [1, 2, 3], 2, cache=cache)
    before = _qmm.decode_cache_copies()
    decode(model, [4], 5, cache=cache)
    assert _qmm.decode_cache_copies() == before  # nothing else held the buffers: no copies

    # a snapshot of the cache (a view of its buffer) keeps its values: the buffer is copied instead
    snapshot = cache[0].state
    keys_then = np.array(snapshot[0])
    offset = cache[0].offset
    for c in cache:
        c.trim(2)  # the next writes land on positions the snapshot still shows
    decode(model, [7], 3, cache=cache)
    assert _qmm.decode_cache_copies() > before
    assert np.array_equal(np.array(snapshot[0]), keys_then) and snapshot[0].shape[2] == offset


def test_other_caches_and_batches_take_the_plain_path(tmp_path, monkeypatch):
    model, _ = load_model(write_model(tmp_path / "m", quantize={"group_size": 32, "bits": 4}), stack=True)
    calls = spy_fused(monkeypatch)
    rotating = model.make_cache(max_kv_size=64)
    model(mx.array([[1, 2, 3]]), cache=rotating)
    mx.eval(model(mx.array([[4]]), cache=rotating))
    batch = model.make_cache()
    model(mx.array([[1, 2], [3, 4]]), cache=batch)
    mx.eval(model(mx.array([[5], [6]]), cache=batch))
    assert not any(calls)  # a rotating cache never reaches it; a batch of two is turned down
    dense, _ = load_model(write_model(tmp_path / "d", quantize={"group_size": 32, "bits": 4}), dense=True, stack=True)
    cache = dense.make_cache()
    dense(mx.array([[1, 2]]), cache=cache)
    assert kernels.decode_layers(dense.layers, mx.zeros((1, 1, 64)), cache, dense.model.rope_rows(2, 1, mx.float32)) is None
    assert all(type(c) is KVCache for c in cache)


def test_scales_keep_the_checkpoint_type(tmp_path):
    path = write_model(tmp_path / "m", quantize={"group_size": 32, "bits": 4})
    weights = mx.load(str(path / "model.safetensors"))
    mx.save_safetensors(str(path / "model.safetensors"),
                        {k: v.astype(mx.float16) if v.dtype == mx.float32 else v for k, v in weights.items()},
                        metadata={"format": "mlx"})
    model, _ = load_model(path, stack=True)
    layer = model.layers[0].self_attn.qkv_proj
    assert layer.scales.dtype == layer.biases.dtype == mx.float16
    assert model.model.embed_tokens(mx.array([[3]])).dtype == mx.float32
    dense, _ = load_model(path, dense=True, stack=True)
    tokens = mx.array([[1, 5, 9, 200, 3, 7]])
    out, ref = np.array(model(tokens)), np.array(dense(tokens))
    assert np.abs(out - ref).max() <= 1e-3 * np.abs(ref).max()


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_scales_match_mlx(dtype):
    rng = np.random.default_rng(3)
    for rows, n, k, bits, gs in [(1, 37, 128, 4, 32), (3, 200, 256, 8, 64), (20, 64, 128, 4, 128), (1, 9, 256, 2, 64)]:
        w = mx.array(rng.normal(size=(n, k)).astype(np.float32) * 0.2)
        wq, s, b = mx.quantize(w, group_size=gs, bits=bits)
        s, b = s.astype(dtype), b.astype(dtype)
        x = mx.array(rng.normal(size=(rows, k)).astype(np.float32))
        ref = mx.quantized_matmul(x, wq, s.astype(mx.float32), b.astype(mx.float32), transpose=True,
                                  group_size=gs, bits=bits)
        out = kernels.quantized_matmul(x, wq, s, b, gs, bits)
        assert np.abs(np.array(out) - np.array(ref)).max() <= 1e-4 * np.abs(np.array(ref)).max() + 1e-6


def test_thread_pool_survives_jobs_of_changing_sizes():
    """Jobs of different task counts back to back (matmuls of several widths, attention split by
    heads) in a fresh process with a deadline: a task must never be lost between two jobs."""
    code = (
        "import mlx.core as mx\n"
        "from mlxllama import kernels\n"
        "ws = []\n"
        "for n in (130, 260, 36, 390, 20, 1030):  # 7, 8, 1, 8, 1 and 8 tasks\n"
        "    ws.append(mx.quantize(mx.random.normal((n, 512)), group_size=32, bits=4))\n"
        "x = mx.random.normal((1, 512))\n"
        "for i in range(4000):\n"
        "    outs = [kernels.quantized_matmul(x, *w, 32, 4) for w in ws]\n"
        "    mx.eval(outs)\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_the_engine_decodes_one_row_through_the_fused_blocks(tmp_path, monkeypatch):
    """The server's engine with one request: plain caches over its buffers, the fused path, the same
    greedy text as generate (and as the engine with a second row, which runs op by op)."""
    import mlxllama

    model, tokenizer = mlxllama.load(str(write_model(tmp_path / "m", quantize={"group_size": 32, "bits": 4})))
    prompt = [1, 5, 9, 200, 3, 7]
    calls = spy_fused(monkeypatch)
    alone = mlxllama.batch_generate(model, tokenizer, [prompt], max_tokens=12)[0]
    if not calls:
        pytest.skip("the random model stopped at once")
    assert all(calls)
    calls.clear()
    pair = mlxllama.batch_generate(model, tokenizer, [prompt, [2, 4, 6]], max_tokens=12)[0]
    assert not any(calls)
    assert alone == pair == mlxllama.generate(model, tokenizer, prompt, max_tokens=12)
