"""The native CPU quantized matmul (mlxllama.kernels) against mx.quantized_matmul, the loader's
CPU weight policy, and the fallback when the extension is missing."""

import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlxllama
from mlxllama import cpu_weights, device, kernels
from mlxllama.loader import load_model
from tinymodels import write_model

needs_kernel = pytest.mark.skipif(not kernels.available(), reason=f"extension not built: {kernels.why_missing()}")


def reference(x, wq, s, b, gs, bits):
    return mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=gs, bits=bits)


def close(out, ref):
    out, ref = np.array(out), np.array(ref)
    scale = np.abs(ref).max() + 1e-6
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 2e-5 * scale * np.sqrt(ref.shape[-1] if ref.ndim else 1) + 1e-6


CASES = [(bits, gs) for bits in (2, 4, 8) for gs in (32, 64, 128) if kernels.supports(bits, gs)] or [(4, 64)]


@needs_kernel
@pytest.mark.parametrize("bits,gs", CASES)
def test_matches_mlx_on_random_shapes(bits, gs):
    rng = np.random.default_rng(bits * 1000 + gs)
    for rows in (1, 2, 3, 7, 8, 9, 13, 16, 17, 40):
        n = int(rng.integers(1, 300))  # ragged output sizes, not multiples of the thread split
        k = gs * int(rng.integers(1, 9))
        w = mx.array(rng.normal(size=(n, k)).astype(np.float32) * 0.2)
        wq, s, b = mx.quantize(w, group_size=gs, bits=bits)
        x = mx.array(rng.normal(size=(rows, k)).astype(np.float32))
        close(kernels.quantized_matmul(x, wq, s, b, gs, bits), reference(x, wq, s, b, gs, bits))


ISAS = {"avx512": ["avx512", "avx2", "generic"], "avx2": ["avx2", "generic"]}.get(
    kernels.info().get("isa"), ["generic"])


@needs_kernel
@pytest.mark.parametrize("isa", ISAS[1:] or ["generic"])
def test_every_instruction_set_matches_mlx(isa):
    """The loops the CPU would not pick by itself (MLXLLAMA_KERNEL_ISA caps the choice): each bit
    width, one-row to 16-row blocks and the dequantized-tile path (17+ rows)."""
    code = (
        "import sys, numpy as np, mlx.core as mx\n"
        "from mlxllama import kernels\n"
        "assert kernels.info()['isa'] == sys.argv[1], kernels.info()\n"
        "rng = np.random.default_rng(0)\n"
        "for bits, gs in ((2, 64), (4, 32), (4, 64), (8, 128)):\n"
        "    w = mx.array(rng.normal(size=(37, 4 * gs)).astype(np.float32))\n"
        "    wq, s, b = mx.quantize(w, group_size=gs, bits=bits)\n"
        "    for rows in (1, 3, 5, 8, 16, 40):\n"
        "        x = mx.array(rng.normal(size=(rows, 4 * gs)).astype(np.float32))\n"
        "        got = np.array(kernels.quantized_matmul(x, wq, s, b, gs, bits))\n"
        "        want = np.array(mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=gs, bits=bits))\n"
        "        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), (bits, gs, rows)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, MLXLLAMA_KERNEL_ISA=isa)
    r = subprocess.run([sys.executable, "-c", code, isa], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@needs_kernel
def test_big_shapes_use_the_threads():
    for n, k, rows in ((4096, 512, 1), (1000, 1024, 5), (700, 256, 100)):
        w = mx.random.normal((n, k), key=mx.random.key(n)) * 0.1
        wq, s, b = mx.quantize(w, group_size=64, bits=4)
        x = mx.random.normal((rows, k), key=mx.random.key(k))
        close(kernels.quantized_matmul(x, wq, s, b, 64, 4), reference(x, wq, s, b, 64, 4))


@needs_kernel
def test_batched_and_strided_activations():
    w = mx.random.normal((96, 128), key=mx.random.key(1))
    wq, s, b = mx.quantize(w, group_size=32, bits=4)
    x = mx.random.normal((2, 3, 128), key=mx.random.key(2))  # (B, L, K)
    close(kernels.quantized_matmul(x, wq, s, b, 32, 4), reference(x, wq, s, b, 32, 4))
    xt = mx.random.normal((128, 5), key=mx.random.key(3)).T  # a transposed view: not row-contiguous
    close(kernels.quantized_matmul(xt, wq, s, b, 32, 4), reference(xt, wq, s, b, 32, 4))
    xb = mx.broadcast_to(mx.random.normal((1, 128), key=mx.random.key(4)), (4, 128))  # stride 0
    close(kernels.quantized_matmul(xb, wq, s, b, 32, 4), reference(xb, wq, s, b, 32, 4))


@needs_kernel
def test_rejects_bad_input():
    wq, s, b = mx.quantize(mx.zeros((8, 64)), group_size=32, bits=4)
    with pytest.raises(ValueError, match="features"):
        kernels.quantized_matmul(mx.zeros((1, 32)), wq, s, b, 32, 4)
    with pytest.raises(ValueError, match="float32"):
        kernels.quantized_matmul(mx.zeros((1, 64), mx.float16), wq, s, b, 32, 4)
    assert not kernels.supports(3, 64) and not kernels.supports(4, 16)


@needs_kernel
def test_gradient_with_respect_to_x_and_compile():
    w = mx.random.normal((48, 64), key=mx.random.key(5))
    wq, s, b = mx.quantize(w, group_size=32, bits=8)
    x = mx.random.normal((3, 64), key=mx.random.key(6))
    g = mx.grad(lambda x: (kernels.quantized_matmul(x, wq, s, b, 32, 8) ** 2).sum())(x)
    g_ref = mx.grad(lambda x: (reference(x, wq, s, b, 32, 8) ** 2).sum())(x)
    close(g, g_ref)
    compiled = mx.compile(lambda x: kernels.quantized_matmul(x, wq, s, b, 32, 8) * 2.0)
    close(compiled(x), reference(x, wq, s, b, 32, 8) * 2.0)


@needs_kernel
def test_loader_keeps_quantized_layers_with_the_kernel(tmp_path):
    path = write_model(tmp_path / "q", quantize={"group_size": 32, "bits": 4})
    model, _ = load_model(path, stack=True)
    assert model.weights_form == "kernel"
    kinds = {type(m) for _, m in model.named_modules()}
    assert kernels.KernelQuantizedLinear in kinds and kernels.KernelQuantizedEmbedding in kinds
    assert nn.Linear not in kinds
    dense, _ = load_model(path, dense=True, stack=True)
    assert dense.weights_form == "dense"
    tokens = mx.array([[1, 5, 9, 200, 3, 7]])
    assert np.allclose(np.array(model(tokens)), np.array(dense(tokens)), atol=1e-4)
    plain, _ = load_model(path, dense=False)  # stays quantized: the kernel on CPU
    assert plain.weights_form == "kernel"


@needs_kernel
def test_lora_wraps_kernel_layers(tmp_path):
    from mlxllama.lora.layers import apply_lora

    path = write_model(tmp_path / "q", quantize={"group_size": 32, "bits": 4})
    model, _ = load_model(path)
    tokens = mx.array([[1, 2, 3]])
    before = np.array(model(tokens))
    apply_lora(model, num_layers=1, rank=4, scale=2.0)  # lora_b starts at zero: same outputs
    assert np.allclose(np.array(model(tokens)), before, atol=1e-5)
    assert model.stack_projections() > 0  # groups without adapters still stack (kernel layers included)
    assert np.allclose(np.array(model(tokens)), before, atol=1e-5)


def test_training_prefers_dense_and_gpu_rules_unchanged(tmp_path):
    path = write_model(tmp_path / "q", quantize={"group_size": 32, "bits": 4})
    model, _ = load_model(path, train=True)
    assert model.weights_form == "dense"
    assert cpu_weights.choose(model, None, mx.float16) == "quantized"  # not float32: not the CPU rules


def test_fallback_without_extension(tmp_path, monkeypatch, capsys):
    """No extension (no compiler at install time): dense on CPU as before, one line said once."""
    monkeypatch.setattr(kernels, "_qmm", None)
    monkeypatch.setattr(kernels, "_why_missing", "not built")
    monkeypatch.setattr(kernels, "_told", False)
    path = write_model(tmp_path / "q", quantize={"group_size": 32, "bits": 4})
    model, _ = load_model(path)
    assert model.weights_form == "dense"
    load_model(path)
    err = capsys.readouterr().err
    assert err.count("native CPU quantized matmul unavailable") == 1 and len(err.strip().splitlines()) == 1
    assert kernels.use_kernel(model) == 0
    quantized, _ = load_model(path, dense=False)
    assert quantized.weights_form == "quantized"
    assert type(quantized.model.layers[0].mlp.down_proj) is nn.QuantizedLinear


def test_fallback_env_var_in_a_fresh_process(tmp_path):
    path = write_model(tmp_path / "q", quantize={"group_size": 32, "bits": 4})
    code = ("from mlxllama.loader import load_model; import sys; m, _ = load_model(sys.argv[1]); "
            "print(m.weights_form)")
    env = dict(os.environ, MLXLLAMA_NO_KERNEL="1")
    r = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "dense"
    assert "disabled by MLXLLAMA_NO_KERNEL" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@needs_kernel
@pytest.mark.slow
def test_default_model_same_greedy_tokens_as_dense(default_model_dir):
    from mlxllama.generate import generate_step

    tokens = {}
    for dense in (True, None):
        model, tok = mlxllama.load(str(default_model_dir), dense=dense)
        assert model.weights_form == ("dense" if dense else "kernel")
        prompt = mx.array(tok.encode("The capital of France is"))
        out = []
        for token, _ in generate_step(prompt, model, max_tokens=24):
            out.append(int(token))
        tokens[dense] = out
    assert tokens[True] == tokens[None]


def test_dense_flag_on_the_cli(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from mlxllama.cli import cli

    path = write_model(tmp_path / "q", quantize={"group_size": 32, "bits": 4})
    forms = []
    real = device.weights_form
    monkeypatch.setattr(device, "weights_form", lambda *a, **k: forms.append(real(*a, **k)) or forms[-1])
    monkeypatch.setattr(device, "_prefer_dense", False)
    for flag in ([], ["--dense"]):
        r = CliRunner().invoke(cli, ["generate", "--model", str(path), *flag, "-p", "hi", "-n", "2"])
        assert r.exit_code == 0, r.output
    assert forms == ["kernel" if kernels.available() else "dense", "dense"]
