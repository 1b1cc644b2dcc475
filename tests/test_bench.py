"""`mlxllama bench` end to end on a tiny model: every path runs, no timing is asserted."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mlxllama.bench import BenchOptions, format_table, run_bench
from mlxllama.bench.shapes import SHAPES, quantized_params, tensors
from tinymodels import write_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("bench") / "tiny", quantize={"group_size": 64, "bits": 4},
                       max_position_embeddings=4096)  # room for the QA prompt layout


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    items = [{"id": "a", "context": "the cat sat on the mat. the cat sat on the mat.", "question": "where?",
              "answers": ["on the mat"]}]
    p.write_text("\n".join(json.dumps(i) for i in items) + "\n")
    return str(p)


def test_bench_end_to_end(tiny, qa_file):
    opts = BenchOptions(models=[str(tiny)], systems=["mlxllama", "mlxllama compiled", "mlx-lm"],
                        prefill_lengths=[8, 16], batch_sizes=[1, 2], decode_tokens=6, decode_prompt=8, trials=1,
                        budget_s=120, ttft=True, ttft_trials=1, lookup=3, qa_path=qa_file, qa_max_tokens=8,
                        llama_cpp=False, progress=False)
    result = run_bench(opts)
    entry = result.models[0]
    for label in ("mlxllama", "mlxllama compiled", "mlx-lm"):
        res = entry["systems"][label]
        assert "error" not in res, res
        assert set(res["prefill"]) == {"8", "16"} and all(v > 0 for v in res["prefill"].values())
        assert res["decode"]["1"] > 0 and res["decode"]["2"] > 0
        assert res["peak_memory_gb"] > 0
    assert entry["ttft"]["mlxllama"] > 0 and entry["ttft"]["mlx-lm"] > 0
    assert entry["lookup"]["same_output"] is True, entry["lookup"]
    table = format_table(result)
    assert "prefill 16 tokens" in table and "decode batch 2" in table and "prompt lookup" in table
    json.loads(result.to_json())


def test_bench_cli_json(tiny, tmp_path):
    from mlxllama.cli import cli

    out = tmp_path / "bench.json"
    r = CliRunner().invoke(cli, ["bench", "--models", str(tiny), "--systems", "mlxllama", "--prefill", "8",
                                 "--batch", "1", "--decode-tokens", "4", "--decode-prompt", "4", "--trials", "1",
                                 "--no-ttft", "--lookup", "0", "--no-llama-cpp", "--json", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["models"][0]["systems"]["mlxllama"]["decode"]["1"] > 0
    assert "decode batch 1" in r.output


def test_unknown_system_is_one_line(tiny):
    from mlxllama.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "--models", str(tiny), "--systems", "vllm", "--no-ttft"])
    assert e.value.code == 1


def test_random_shapes_are_the_real_ones():
    """Parameter counts of the shapes (embedding counted once when tied)."""
    assert abs(quantized_params(SHAPES["llama-3.2-1b"]) - 1.236e9) < 0.01e9
    assert abs(quantized_params(SHAPES["llama-3-8b"]) - 8.03e9) < 0.01e9
    names = [k for k, _ in tensors(dict(SHAPES["llama-3.2-1b"], num_hidden_layers=1, vocab_size=128,
                                        hidden_size=128, intermediate_size=256, num_attention_heads=2,
                                        num_key_value_heads=1))]
    assert "model.layers.0.self_attn.q_proj.scales" in names and "lm_head.weight" not in names


def test_random_model_loads_here_and_in_mlx_lm(tmp_path):
    """A random-weight folder with the synthetic byte tokenizer (no default model at hand)."""
    import mlx_lm

    from mlxllama.bench.shapes import write_random_model
    from mlxllama.generate import generate

    shape = dict(SHAPES["llama-3.2-1b"], num_hidden_layers=2, vocab_size=512, hidden_size=128,
                 intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    path = write_random_model("small", tmp_path / "m", tokenizer_dir=None, shape=shape)
    from mlxllama.loader import load

    model, tok = load(str(path))
    assert isinstance(generate(model, tok, "hello", max_tokens=4), str)
    m2, tok2 = mlx_lm.load(str(path))
    assert isinstance(mlx_lm.generate(m2, tok2, "hello", max_tokens=4), str)


def test_cold_start_timeout_is_reported():
    from mlxllama.bench import time_to_first_token
    from mlxllama.bench.report import rows_for

    assert time_to_first_token(["sleep", "5"], timeout=0.5) is None
    assert time_to_first_token(["bash", "-c", "echo ==========; echo x"], after=b"==========\n", timeout=5) > 0
    rows = rows_for({"systems": {}, "ttft": {"mlxllama": 1.5, "mlx-lm": None, "mlx-lm timeout": 300.0}})
    assert rows[0][2] == {"mlxllama": 1.5, "mlx-lm": ">300 s"}
