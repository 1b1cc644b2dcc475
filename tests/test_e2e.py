"""End to end on the real default model (SmolLM2-135M-Instruct, 4-bit): CLI and API."""

import subprocess
import sys

import mlx.core as mx
import pytest

import mlxllama

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smol(default_model_dir):
    return mlxllama.load(default_model_dir)


def chat_tokens(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=True)


def test_api_answers_the_capital_of_france(smol):
    model, tokenizer = smol
    text = mlxllama.generate(model, tokenizer, chat_tokens(tokenizer, QUESTION), max_tokens=12)
    assert "Paris" in text


def test_greedy_tokens_match_mlx_lm(smol, default_model_dir):
    """The same folder through mlx-lm (float32, quantized matmul) gives the same greedy tokens."""
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.generate import generate_step as mlx_lm_step

    model, tokenizer = smol
    prompt = chat_tokens(tokenizer, QUESTION)
    ours = [t for t, _ in mlxllama.generate_step(mx.array(prompt), model, max_tokens=10)]
    theirs_model, _ = mlx_lm_load(str(default_model_dir))
    theirs_model.set_dtype(mx.float32)
    theirs = [int(t) for (t, _), _ in zip(mlx_lm_step(mx.array(prompt), theirs_model), range(10))]
    assert ours == theirs


def test_cli_generate_streams_and_reports(default_model_dir):
    r = subprocess.run([sys.executable, "-m", "mlxllama", "generate", "--model", str(default_model_dir),
                        "--prompt", QUESTION, "--max-tokens", "12", "--verbose"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "Generation:" in r.stderr and "Peak memory" in r.stderr


def test_streaming_is_whole_characters(smol):
    model, tokenizer = smol
    prompt = chat_tokens(tokenizer, "Say hello in Chinese and add an emoji.")
    pieces = [r.text for r in mlxllama.stream_generate(model, tokenizer, prompt, max_tokens=24)]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == mlxllama.generate(model, tokenizer, prompt, max_tokens=24)


def test_prompt_lookup_drafts_from_the_cached_document(smol):
    """With a prompt cache, prompt lookup also drafts from the tokens the cache holds
    (lookup_context): the same greedy text, most of a copied answer from accepted drafts."""
    model, tokenizer = smol
    doc = "Note: the launch code for the lab door is 7 4 1 9 2 8 3 6, and it changes every Monday."
    prompt = chat_tokens(tokenizer, f"{doc}\nWhat is the launch code for the lab door?")
    head, last = prompt[:-1], prompt[-1:]

    def run(**kwargs):
        cache = model.make_cache()
        model(mx.array(head)[None], cache=cache)
        mx.eval([c.state for c in cache])
        records = list(mlxllama.stream_generate(model, tokenizer, last, max_tokens=24, prompt_cache=cache, **kwargs))
        return "".join(r.text for r in records), sum(r.from_draft for r in records)

    plain, _ = run()
    blind, blind_drafted = run(prompt_lookup=4)  # the prompt is one token: nothing to draft from
    seen, drafted = run(prompt_lookup=4, lookup_context=head)
    assert "7 4 1 9 2 8 3 6" in plain
    assert seen == plain == blind
    assert drafted >= 8 > blind_drafted
