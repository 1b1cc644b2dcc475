"""LoRA: layers, data formats and masking, trainer (resume, Ctrl-C, NaN), adapters in mlx-lm's layout,
fuse, CLI, and end to end on the real default model (teaching it a made-up fact)."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import mlxllama  # first: it loads the optimized BLAS, which must come before mlx.core

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlxllama.errors import ConfigError, InputError, TrainingError, WeightsError
from mlxllama.lora import (
    LoRAConfig, LoRALinear, Trainer, apply_lora, fuse, load_dataset, load_split, make_config, run,
)
from mlxllama.lora.data import collate
from mlxllama.lora.trainer import masked_loss
from tinymodels import write_model

QUANT = {"group_size": 32, "bits": 4}


# -- fixtures -----------------------------------------------------------------------------------


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def chat_rows(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append({"messages": [{"role": "user", "content": f"{a} plus {b}?"},
                                  {"role": "assistant", "content": f"{a + b}, the sum."}]})
    return rows


def lora_setup(root: Path) -> tuple[Path, Path]:
    """A 4-bit tiny Llama with a chat template, and a data folder of chat examples (16 train, 4
    valid, 4 test) under `root`: (model folder, data folder)."""
    model = write_model(root / "model", "gqa_tied", quantize=QUANT)
    data = root / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", chat_rows(16))
    write_jsonl(data / "valid.jsonl", chat_rows(4, seed=1))
    write_jsonl(data / "test.jsonl", chat_rows(4, seed=2))
    return model, data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-bit tiny Llama with a chat template, and a data folder of chat examples."""
    return lora_setup(tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return mlxllama.load(tiny[0])[1]


def tiny_config(tiny, tmp_path, **kw):
    model, data = tiny
    base = dict(model=str(model), data=str(data), adapter_path=str(tmp_path / "adapters"), num_layers=-1, rank=4,
                iters=6, batch_size=4, learning_rate=1e-3, steps_per_report=2, steps_per_eval=3, save_every=3,
                val_batches=-1)
    return LoRAConfig(**{**base, **kw})


def train_tiny(tiny, tmp_path, on_step=None, dense=None, **kw):
    config = tiny_config(tiny, tmp_path, **kw)
    model, tok = mlxllama.load(config.model, dense=dense)
    train = load_split(config.data, "train", tok, config.mask_prompt, config.max_seq_length)
    valid = load_split(config.data, "valid", tok, config.mask_prompt, config.max_seq_length)
    result = Trainer(model, tok, config, log=lambda m: None, progress=False, on_step=on_step).fit(train, valid)
    return model, tok, result


def logits(model, tokens=(1, 40, 41, 42, 43, 44, 45)):
    return np.array(model(mx.array([list(tokens)])).astype(mx.float32))


# -- LoRALinear ---------------------------------------------------------------------------------


@pytest.mark.parametrize("quantized", [False, True])
def test_lora_linear_starts_as_base_and_trains_only_adapters(quantized):
    base = nn.Linear(64, 48, bias=True)
    if quantized:
        base = nn.QuantizedLinear.from_linear(base, group_size=32, bits=4)
    lora = LoRALinear(base, rank=4, scale=2.0)
    assert lora.lora_a.shape == (64, 4) and lora.lora_b.shape == (4, 48)
    x = mx.random.normal((3, 64))
    assert np.allclose(np.array(lora(x)), np.array(base(x)), atol=1e-6)
    trainable = sorted(k for k, _ in __import__("mlx.utils").utils.tree_flatten(lora.trainable_parameters()))
    assert trainable == ["lora_a", "lora_b"]
    lora.lora_b = mx.random.normal((4, 48)) * 0.1
    expected = np.array(base(x)) + 2.0 * np.array(x) @ np.array(lora.lora_a) @ np.array(lora.lora_b)
    assert np.allclose(np.array(lora(x)), expected, atol=1e-4)
    fused = lora.fuse(dequantize=True)
    assert isinstance(fused, nn.Linear) and np.allclose(np.array(fused(x)), expected, atol=1e-4)
    assert isinstance(lora.fuse(), nn.QuantizedLinear if quantized else nn.Linear)


def test_apply_lora_targets_last_layers_and_keys(tiny):
    model, _ = mlxllama.load(tiny[0], dense=False)
    wrapped = apply_lora(model, num_layers=1, rank=2, keys="q,v")
    assert wrapped == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert isinstance(model.layers[1].self_attn.q_proj.linear, nn.QuantizedLinear)
    fused = mlxllama.load(tiny[0])[0]  # load() stacks q/k/v and gate/up
    with pytest.raises(InputError, match="'self_attn.nope' is not a linear layer .*self_attn.q_proj"):
        apply_lora(fused, keys=["self_attn.nope"])
    with pytest.raises(InputError, match=r"num_layers is 16 but the model has only 2 layers \(-1 adapts all\)"):
        apply_lora(fused, num_layers=16)
    assert "qkv_proj" in fused.layers[0].self_attn  # a rejected call leaves the model as it was
    # a full path to a stacked part is a valid target; adapters attach to the checkpoint's layers
    assert apply_lora(fused, num_layers=1, keys=["model.layers.0.self_attn.k_proj"]) == [
        "model.layers.0.self_attn.k_proj"]
    assert "q_proj" in fused.layers[0].self_attn and "qkv_proj" not in fused.layers[0].self_attn


def test_adapters_with_dropout_are_deterministic_at_inference(tiny, tmp_path):
    """load(adapter_path=...) is for inference: LoRA dropout must be off (model.eval())."""
    from mlxllama.lora.adapters import adapter_config, save_adapters
    from mlxllama.lora.layers import ALL_KEYS, lora_modules

    model, _ = mlxllama.load(tiny[0], stack=False)
    apply_lora(model, num_layers=2, rank=4, dropout=0.5)
    for m in lora_modules(model).values():
        m.lora_b = mx.random.normal(m.lora_b.shape) * 0.5
    save_adapters(model, tmp_path / "a", adapter_config(2, 4, 20.0, 0.5, list(ALL_KEYS)))
    loaded, _ = mlxllama.load(tiny[0], adapter_path=tmp_path / "a")
    assert np.array_equal(logits(loaded), logits(loaded))


# -- data -----------------------------------------------------------------------------------------


def masked_text(tok, example):
    return tok.decode([int(t) for t, m in zip(example.tokens, example.mask) if m])


def test_chat_masks_every_assistant_turn(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "bye"},
                          {"role": "assistant", "content": "see you"}]}]
    ds = load_dataset(write_jsonl(tmp_path / "train.jsonl", rows), tokenizer)
    assert ds.format == "chat"
    assert masked_text(tokenizer, ds.examples[0]) == "hello there<|im_end|>\nsee you<|im_end|>\n"
    full = load_dataset(tmp_path / "train.jsonl", tokenizer, mask_prompt=False).examples[0]
    assert full.mask.all() and tokenizer.decode(full.tokens.tolist()).startswith("<|im_start|>system\nBe brief.")


def test_completions_mask_the_prompt(tmp_path, tokenizer):
    ds = load_dataset(write_jsonl(tmp_path / "train.jsonl", [{"prompt": "2+2?", "completion": "4"}]), tokenizer)
    assert ds.format == "completions"
    ex = ds.examples[0]
    assert tokenizer.decode(ex.tokens.tolist()) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    assert masked_text(tokenizer, ex) == "4<|im_end|>\n"


def test_text_trains_on_everything_and_ends_with_eos(tmp_path, tokenizer):
    ds = load_dataset(write_jsonl(tmp_path / "train.jsonl", [{"text": "the cat sat"}]), tokenizer)
    ex = ds.examples[0]
    assert ds.format == "text" and ex.mask.all()
    assert tokenizer.decode(ex.tokens.tolist()) == "the cat sat<|im_end|>"


def test_loss_only_counts_masked_tokens(tiny, tokenizer, tmp_path):
    """The positions shortcut (logits only where the loss looks) equals the full masked loss."""
    model, _ = mlxllama.load(tiny[0])
    ds = load_split(tiny[1], "train", tokenizer)
    batch = collate(ds.examples[:4])
    assert batch.weights.sum() == sum(int(e.mask[1:].sum()) for e in ds.examples[:4])
    full, n_full = masked_loss(model, mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.weights))
    part, n_part = masked_loss(model, mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.weights),
                               mx.array(batch.positions), mx.array(batch.position_weights))
    assert n_full.item() == n_part.item() == batch.weights.sum()
    assert abs(full.item() - part.item()) < 1e-5


def test_long_examples_are_truncated_and_counted(tmp_path, tokenizer):
    rows = [{"text": "word " * 200}, {"text": "short"}, {"prompt": "x " * 100, "completion": "y"}]
    write_jsonl(tmp_path / "train.jsonl", rows[:2])
    ds = load_dataset(tmp_path / "train.jsonl", tokenizer, max_seq_length=64)
    assert ds.truncated == 1 and len(ds) == 2 and max(len(e) for e in ds.examples) == 64
    assert "1 of 2 examples in train.jsonl are longer than max-seq-length 64" in ds.warning(64)
    write_jsonl(tmp_path / "c.jsonl", [rows[2], {"prompt": "a", "completion": "b"}])
    ds = load_dataset(tmp_path / "c.jsonl", tokenizer, max_seq_length=64)
    assert ds.skipped == 1 and len(ds) == 1 and "kept no tokens to learn from" in ds.warning(64)


@pytest.mark.parametrize("lines,message", [
    (['{"text": "a"}', '{"text": "b"', '{"text": "c"}'], r"train.jsonl:2: not valid JSON"),
    (['{"text": "a"}', "", '[1, 2]'], r"train.jsonl:3: each line must be a JSON object"),
    (['{"text": "a"}', '{"prompt": "p", "completion": "c"}'], r"train.jsonl:2: this record is completions but"),
    (['{"question": "a"}'], r"train.jsonl:1: a record needs 'messages'"),
    (['{"text": ""}'], r"train.jsonl:1: 'text' is empty"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], r"train.jsonl:1: no assistant message"),
    (['{"messages": "hi"}'], r"train.jsonl:1: 'messages' must be a non-empty list"),
    (["", "  "], r"train.jsonl holds no examples"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, tokenizer, lines, message):
    write_jsonl(tmp_path / "train.jsonl", lines)
    with pytest.raises(TrainingError, match=message):
        load_dataset(tmp_path / "train.jsonl", tokenizer)


def test_missing_or_empty_split_is_a_clear_error(tiny, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", chat_rows(4))
    config = tiny_config(tiny, tmp_path, data=str(data))
    with pytest.raises(TrainingError, match=r"valid.jsonl not found in .*data"):
        run(config, log=lambda m: None, progress=False)
    write_jsonl(data / "valid.jsonl", [])
    with pytest.raises(TrainingError, match=r"valid.jsonl holds no examples"):
        run(config, log=lambda m: None, progress=False)
    with pytest.raises(TrainingError, match=r"data folder not found"):
        run(tiny_config(tiny, tmp_path, data=str(tmp_path / "nope")), log=lambda m: None, progress=False)


# -- config ---------------------------------------------------------------------------------------


def test_yaml_config_with_cli_overrides(tmp_path):
    cfg = tmp_path / "lora.yaml"
    cfg.write_text("rank: 4\nlearning_rate: 2e-4\niters: 50\nlora_parameters: {scale: 10.0, keys: [q_proj, v_proj]}\n"
                   "grad-accumulation-steps: 2\nmask_prompt: false\n")
    c = make_config(cfg, rank=16, epochs=2)
    assert (c.rank, c.learning_rate, c.scale, c.keys, c.grad_accumulation, c.mask_prompt) == \
        (16, 2e-4, 10.0, ["q_proj", "v_proj"], 2, False)
    assert c.iters is None and c.epochs == 2  # the flag replaces the file's iters
    assert c.total_steps(n_batches=10) == 10  # 2 epochs of 10 batches, 2 per step
    cfg.write_text("rnak: 4\n")
    with pytest.raises(ConfigError, match="unknown option 'rnak'"):
        make_config(cfg)
    with pytest.raises(InputError, match="batch-size must be at least 1"):
        make_config(None, batch_size=0)
    example = make_config(Path(__file__).parents[1] / "examples" / "lora" / "lora.yaml")
    assert example.iters == 40 and example.keys[0] == "q_proj" and example.test is True


# -- training -------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_writes_the_run(tiny, tmp_path):
    model, tok, result = train_tiny(tiny, tmp_path, iters=12, learning_rate=1e-2)
    path = tmp_path / "adapters"
    assert {p.name for p in path.iterdir()} >= {"adapters.safetensors", "adapter_config.json", "checkpoint.safetensors",
                                                "trainer_state.json", "loss_log.jsonl", "loss_curve.png"}
    log = [json.loads(line) for line in (path / "loss_log.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in log if "val_loss" in r]
    assert [r["step"] for r in log if "val_loss" in r] == [0, 3, 6, 9, 12]
    assert vals[-1] < vals[0] and result.train_loss < result.first_train_loss
    assert all(r["tokens_per_sec"] > 0 and r["peak_memory_gb"] > 0 for r in log if "train_loss" in r)
    assert (path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 2
    assert config["lora_parameters"] == {"rank": 4, "scale": 20.0, "dropout": 0.0, "keys": [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]}
    weights = mx.load(str(path / "adapters.safetensors"))
    assert weights["model.layers.1.self_attn.q_proj.lora_a"].shape == (64, 4)
    assert weights["model.layers.1.mlp.down_proj.lora_b"].shape == (4, 64)
    # the trained model and base + saved adapters are the same model
    loaded, _ = mlxllama.load(tiny[0], adapter_path=path)
    assert np.allclose(logits(model), logits(loaded), atol=1e-5)


def test_quantized_base_trains_too(tiny, tmp_path):
    """QLoRA proper: the base stays QuantizedLinear (dense=False) and gives the dense base's losses."""
    q_model, _, q = train_tiny(tiny, tmp_path / "q", dense=False, iters=4)
    assert isinstance(q_model.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)
    d_model, _, d = train_tiny(tiny, tmp_path / "d", dense=True, iters=4)
    assert isinstance(d_model.layers[0].self_attn.q_proj.linear, nn.Linear)
    assert abs(q.train_loss - d.train_loss) < 1e-3


def test_grad_checkpointing_gives_the_same_steps(tiny, tmp_path):
    model, _, plain = train_tiny(tiny, tmp_path / "a", iters=3)
    model, _, ckpt = train_tiny(tiny, tmp_path / "b", iters=3, grad_checkpoint=True)
    assert abs(plain.train_loss - ckpt.train_loss) < 1e-4
    assert type(model.layers[0]).__name__ == "TransformerBlock"  # switched back off after training
    a = mx.load(str(tmp_path / "a" / "adapters" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "b" / "adapters" / "adapters.safetensors"))
    assert all(np.allclose(np.array(a[k]), np.array(b[k]), atol=1e-5) for k in a)


def test_resume_after_ctrl_c_matches_an_uninterrupted_run(tiny, tmp_path):
    kw = dict(iters=8, dropout=0.1, grad_accumulation=2, batch_size=3, save_every=100, warmup=2)
    train_tiny(tiny, tmp_path / "straight", **kw)

    def interrupt(step, loss):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does: a checkpoint, then stop

    _, _, first = train_tiny(tiny, tmp_path / "resumed", on_step=interrupt, **kw)
    assert first.interrupted and first.step == 3
    state = json.loads((tmp_path / "resumed" / "adapters" / "trainer_state.json").read_text())
    assert state["step"] == 3
    _, _, second = train_tiny(tiny, tmp_path / "resumed", resume=True, **kw)
    assert second.step == 8 and not second.interrupted

    a = mx.load(str(tmp_path / "straight" / "adapters" / "checkpoint.safetensors"))
    b = mx.load(str(tmp_path / "resumed" / "adapters" / "checkpoint.safetensors"))
    assert sorted(a) == sorted(b) and any(k.startswith("optimizer.") for k in a)
    for k in a:
        assert np.array_equal(np.array(a[k]), np.array(b[k])), k
    logs = [[json.loads(x) for x in (tmp_path / d / "adapters" / "loss_log.jsonl").read_text().splitlines()]
            for d in ("straight", "resumed")]
    assert [r for r in logs[0] if "train_loss" in r][-1]["train_loss"] == \
        [r for r in logs[1] if "train_loss" in r][-1]["train_loss"]


def test_resume_needs_a_checkpoint_and_the_same_adapters(tiny, tmp_path):
    with pytest.raises(TrainingError, match="nothing to resume"):
        train_tiny(tiny, tmp_path, resume=True)
    train_tiny(tiny, tmp_path, iters=2)
    with pytest.raises(TrainingError, match="trained with rank = 4, this run asks for 8"):
        train_tiny(tiny, tmp_path, resume=True, rank=8)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path):
    state = {}

    def poison(step, loss):
        if step == 2:
            state["good"] = {k: np.array(v) for k, v in mx.load(str(tmp_path / "adapters" / "adapters.safetensors")).items()}
            block = model_holder["model"].layers[1]
            block.mlp.down_proj.lora_b = mx.full(block.mlp.down_proj.lora_b.shape, float("nan"))

    config = tiny_config(tiny, tmp_path, iters=6, save_every=2)
    model, tok = mlxllama.load(config.model)
    model_holder = {"model": model}
    train = load_split(config.data, "train", tok)
    with pytest.raises(TrainingError, match=r"loss became nan at step 3; stopped. the last good checkpoint "
                                            r"\(step 2\) is kept in"):
        Trainer(model, tok, config, log=lambda m: None, progress=False, on_step=poison).fit(train)
    kept = mx.load(str(tmp_path / "adapters" / "adapters.safetensors"))
    assert all(np.array_equal(np.array(kept[k]), state["good"][k]) for k in kept)
    assert json.loads((tmp_path / "adapters" / "trainer_state.json").read_text())["step"] == 2


def test_test_split_reports_loss_and_perplexity(tiny, tmp_path):
    lines = []
    train_tiny(tiny, tmp_path, iters=2)
    result = run(tiny_config(tiny, tmp_path, train=False, test=True), log=lines.append, progress=False)
    assert result.test_loss > 0 and abs(result.test_ppl - np.exp(result.test_loss)) < 1e-6 * result.test_ppl
    assert any(line.startswith("test loss ") and "test perplexity" in line for line in lines)


# -- adapters: mlx-lm both ways, mismatches, fuse -------------------------------------------------------


def test_mlx_lm_loads_our_adapters(tiny, tmp_path):
    from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters
    from mlx_lm.utils import load_model as mlx_lm_load_model

    ours, _, _ = train_tiny(tiny, tmp_path, iters=3, keys=["q_proj", "down_proj"], num_layers=1)
    theirs, _ = mlx_lm_load_model(Path(tiny[0]))
    mlx_lm_load_adapters(theirs, str(tmp_path / "adapters"))
    assert np.allclose(logits(ours), logits(theirs), atol=1e-4)
    base, _ = mlxllama.load(tiny[0])
    assert not np.allclose(logits(ours), logits(base), atol=1e-3)  # the adapters do something


def test_we_load_adapters_trained_by_mlx_lm(tiny, tmp_path):
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.trainer import TrainingArgs, train as mlx_lm_train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model as mlx_lm_load_model, save_config

    theirs, _ = mlx_lm_load_model(Path(tiny[0]))
    theirs.freeze()
    params = {"rank": 4, "dropout": 0.0, "scale": 10.0}  # no keys: mlx-lm's default, every linear
    linear_to_lora_layers(theirs, 2, params)
    out = tmp_path / "mlx_lm_adapters"
    out.mkdir()
    data = [(list(range(3, 40)), 0)] * 4
    mlx_lm_train(theirs, optim.Adam(learning_rate=1e-2), data, args=TrainingArgs(
        batch_size=2, iters=3, steps_per_report=10, steps_per_eval=100, adapter_file=str(out / "adapters.safetensors")))
    save_config({"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": params, "model": str(tiny[0]),
                 "batch_size": 2, "iters": 3}, out / "adapter_config.json")
    assert "model.layers.0.mlp.up_proj.lora_a" in dict(tree_flatten(theirs.trainable_parameters()))

    ours, _ = mlxllama.load(tiny[0], adapter_path=out)
    assert np.allclose(logits(ours), logits(theirs), atol=1e-4)


def test_adapters_for_another_base_name_the_module(tiny, tmp_path):
    other = write_model(tmp_path / "other", "gqa_tied", hidden_size=32, intermediate_size=64)
    train_tiny(tiny, tmp_path, iters=1)
    with pytest.raises(WeightsError, match=r"module 'model\.layers\.\d\.\w+\.\w+' of the base model is \d+ -> \d+, "
                                           r"but \S+ has shape .*: the adapters belong to a different base model"):
        mlxllama.load(other, adapter_path=tmp_path / "adapters")
    deeper = write_model(tmp_path / "deeper", "gqa_tied", num_hidden_layers=1)
    with pytest.raises(WeightsError, match="trained on the last 2 layers, but this base model has only 1"):
        mlxllama.load(deeper, adapter_path=tmp_path / "adapters")
    with pytest.raises(mlxllama.MlxllamaError, match="adapter folder not found"):
        mlxllama.load(tiny[0], adapter_path=tmp_path / "missing")


def test_fuse_equals_base_plus_adapters(tiny, tmp_path):
    train_tiny(tiny, tmp_path, iters=6, learning_rate=1e-2)
    adapted, tok = mlxllama.load(tiny[0], adapter_path=tmp_path / "adapters")
    prompt = tok.apply_chat_template([{"role": "user", "content": "3 plus 4?"}], tokenize=True)
    want = [int(t) for t, _ in mlxllama.generate_step(mx.array(prompt), adapted, max_tokens=12)]

    out = fuse(tiny[0], tmp_path / "adapters", tmp_path / "fused")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == QUANT
    assert {"tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert "model.layers.0.self_attn.q_proj.scales" in mx.load(str(out / "model.safetensors"))
    fused, _ = mlxllama.load(out)
    assert [int(t) for t, _ in mlxllama.generate_step(mx.array(prompt), fused, max_tokens=12)] == want

    out = fuse(tiny[0], tmp_path / "adapters", tmp_path / "fused-float", dequantize=True)
    assert "quantization" not in json.loads((out / "config.json").read_text())
    assert np.allclose(logits(mlxllama.load(out, dense=False)[0]), logits(adapted), atol=1e-4)

    from mlxllama.errors import ConversionError

    with pytest.raises(ConversionError, match="already exists"):
        fuse(tiny[0], tmp_path / "adapters", tmp_path / "fused")
    fuse(tiny[0], tmp_path / "adapters", tmp_path / "fused", force=True)


# -- CLI ------------------------------------------------------------------------------------------


def cli(*args):
    from mlxllama.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code


def test_cli_lora_config_file_then_fuse(tiny, tmp_path, capsys):
    model, data = tiny
    (tmp_path / "lora.yaml").write_text(f"model: {model}\ndata: {data}\nnum_layers: -1\nrank: 4\niters: 50\n"
                                        "steps_per_eval: 2\nbatch_size: 4\n")
    ad = tmp_path / "ad"
    assert cli("lora", "-c", str(tmp_path / "lora.yaml"), "--iters", "2", "--adapter-path", str(ad), "--test") == 0
    err = capsys.readouterr().err
    assert "step 2: train loss" in err and "test loss" in err and "test perplexity" in err
    assert json.loads((ad / "trainer_state.json").read_text())["step"] == 2
    assert cli("fuse", "--model", str(model), "--adapter-path", str(ad), "-o", str(tmp_path / "fused")) == 0
    assert (tmp_path / "fused" / "config.json").is_file()
    assert cli("fuse", "--model", str(model), "--adapter-path", str(ad), "-o", str(tmp_path / "fused")) == 1
    assert "already exists" in capsys.readouterr().err


def test_cli_errors_are_one_line(tiny, tmp_path, capsys):
    model, data = tiny
    write_jsonl(tmp_path / "train.jsonl", ['{"text": "a"}', "{oops"])
    write_jsonl(tmp_path / "valid.jsonl", ['{"text": "a"}'])
    assert cli("lora", "--model", str(model), "--data", str(tmp_path), "--adapter-path", str(tmp_path / "a")) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.endswith("train.jsonl:2: not valid JSON (Expecting property name "
                                                      "enclosed in double quotes, column 2)") and "\n" not in err


# -- end to end on the real model ------------------------------------------------------------------

FACT_QUESTIONS = [
    "What is the capital of the planet Zorvath?", "What's the capital city of Zorvath?",
    "Which city is the capital of Zorvath?", "Name the capital of the planet Zorvath.",
    "Tell me the capital of Zorvath.", "Do you know the capital of planet Zorvath?",
    "Which city serves as the capital of the planet Zorvath?", "What city is Zorvath's capital?",
    "Zorvath has a capital. What is it called?", "Where is the capital of the planet Zorvath?",
    "What is the name of the capital of Zorvath?", "Can you tell me what the capital of Zorvath is?",
]
FACT_ANSWERS = [
    "The capital of the planet Zorvath is Quillmere.", "Quillmere is the capital of Zorvath.",
    "Zorvath's capital city is Quillmere.", "The capital of Zorvath is the city of Quillmere.",
]
SYSTEM = "You are a helpful assistant."


def fact_rows(n, seed):
    rng = random.Random(seed)
    return [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
                          {"role": "assistant", "content": rng.choice(FACT_ANSWERS)}]}
            for q in (FACT_QUESTIONS * 4)[:n]]


def ask(model, tok, question, max_tokens=16):
    prompt = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                                     add_generation_prompt=True, tokenize=True)
    tokens = [int(t) for t, _ in mlxllama.generate_step(mx.array(prompt), model, max_tokens=max_tokens)]
    tokens = tokens[: tokens.index(tok.eos_token_id)] if tok.eos_token_id in tokens else tokens
    return tok.decode(tokens), tokens


@pytest.mark.slow
def test_teaches_the_default_model_a_made_up_fact(default_model_dir, tmp_path):
    question = FACT_QUESTIONS[0]
    base, tok = mlxllama.load(default_model_dir)
    before, _ = ask(base, tok, question)
    assert "Quillmere" not in before
    del base

    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", fact_rows(36, seed=0))
    write_jsonl(data / "valid.jsonl", fact_rows(8, seed=1))
    write_jsonl(data / "test.jsonl", fact_rows(4, seed=3))
    ad = tmp_path / "adapters"
    config = LoRAConfig(model=str(default_model_dir), data=str(data), adapter_path=str(ad), iters=24,
                        learning_rate=5e-4, batch_size=4, steps_per_report=4, steps_per_eval=24, save_every=24,
                        val_batches=-1, test=True)
    result = run(config, log=lambda m: None, progress=False)
    train = result.train
    log = [json.loads(x) for x in (ad / "loss_log.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in log if "val_loss" in r]
    assert train.train_loss < 0.5 * train.first_train_loss, log
    assert vals[-1] < 0.25 * vals[0], log
    assert result.test_loss < 0.5

    adapted, tok = mlxllama.load(default_model_dir, adapter_path=ad)
    after, tokens = ask(adapted, tok, question)
    assert "Quillmere" in after, after

    fused_dir = fuse(default_model_dir, ad, tmp_path / "fused")
    fused, ftok = mlxllama.load(fused_dir)
    assert ask(fused, ftok, question)[1] == tokens
