"""Device policy (mlxllama.device) and the model's backend seam (models/backend.py)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from tinymodels import make_model

from mlxllama import _platform, device
from mlxllama.errors import ConfigError
from mlxllama.models.backend import Backend, CPUBackend, select_backend


def test_facts_are_public():
    facts = device.facts()
    assert facts["device"] == device.kind() == ("cpu" if mx.default_device() == mx.cpu else "gpu")
    assert device.blas() == _platform.loaded_blas()
    assert facts["blas"] == (device.blas() or "mlx's own")
    assert "available" in facts["kernel"]


def test_compute_dtype():
    weights = {"w": mx.zeros((2, 2), dtype=mx.bfloat16)}
    assert device.compute_dtype(weights, "float16") == mx.float16
    with pytest.raises(ConfigError, match="unknown dtype 'float8'"):
        device.compute_dtype(weights, "float8")
    if device.on_cpu():
        assert device.compute_dtype(weights) == mx.float32
        assert not device.compiled_step_default() and not device.overlap_steps()


def test_loader_names_still_there():
    from mlxllama import cpu_weights, loader

    assert loader.compute_dtype is device.compute_dtype and loader.DTYPES is device.DTYPES
    assert cpu_weights.choose is device.weights_form and cpu_weights.dense_fits is device.dense_fits


def test_select_backend():
    model, _ = make_model("gqa_tied")
    assert isinstance(select_backend(model.args, cpu=False), Backend)
    assert not isinstance(select_backend(model.args, cpu=False), CPUBackend)
    assert select_backend(model.args, cpu=True).table is not None
    assert select_backend(make_model("gqa_tied", rope_traditional=True)[0].args, cpu=True).table is None
    assert Backend().rope_rows(0, 4, mx.float32) is None
    assert select_backend(model.args, cpu=True).rope_rows(mx.array([0, 3]), 1, mx.float32) is None  # row offsets


@pytest.mark.parametrize("name", ["gqa_tied", "qwen2_bias", "llama3_rope"])
def test_cpu_backend_gives_plain_mlx_logits(name):
    """A 20-token prompt chunk (NumPy softmax and SiLU, the rotary table) then decode steps."""
    model, _ = make_model(name)
    model.use_backend(select_backend(model.args, cpu=True))
    tokens = mx.array([[(7 * i + 3) % 200 for i in range(23)]])
    outs = {}
    for kind in ("cpu", "mlx"):
        if kind == "mlx":
            model.use_backend(Backend())
        cache = model.make_cache()
        steps = [model(tokens[:, :20], cache=cache)] + [model(tokens[:, i : i + 1], cache=cache) for i in range(20, 23)]
        outs[kind] = np.array(mx.concatenate(steps, axis=1))
        assert model.layers[0].mlp.backend is model.backend
    np.testing.assert_allclose(outs["cpu"], outs["mlx"], atol=1e-4)


def test_generate_compiled_none_follows_the_device():
    from mlxllama.generate import generate_step

    model, _ = make_model("gqa_tied")
    prompt = mx.array([1, 5, 9, 20])
    want = [t for t, _ in generate_step(prompt, model, max_tokens=6, compiled=device.compiled_step_default())]
    assert [t for t, _ in generate_step(prompt, model, max_tokens=6, compiled=None)] == want


def test_memory_facts():
    assert device.memory_bytes() is None or device.memory_bytes() > 1 << 20
    if not mx.metal.is_available():
        assert device.working_set_bytes() is None
        with device.wired_limit():  # nothing to wire off Metal
            pass
        device.wire_memory()
    from mlxllama.serve.engine import default_max_kv_bytes

    assert default_max_kv_bytes() == (device.working_set_bytes() or device.memory_bytes() or 16 << 30) // 2
