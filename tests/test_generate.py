"""Generation layers on a tiny random model: stop strings, EOS, seeds, max tokens, batches."""

import mlx.core as mx
import pytest

import mlxllama
from mlxllama.errors import InputError
from mlxllama.generate import StopMatcher, generate_step
from tinymodels import write_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_model(tmp_path_factory.mktemp("tiny"), "gqa_tied")
    return mlxllama.load(path)


def test_stop_string_split_across_tokens_is_not_printed():
    m = StopMatcher(["STOP"])
    out = []
    for piece in ["Hello S", "T", "O", "P and more"]:
        text, stopped = m.feed(piece)
        out.append(text)
        if stopped:
            break
    assert "".join(out) == "Hello " and stopped


def test_held_back_text_is_released_when_not_a_stop():
    m = StopMatcher(["STOP"])
    assert m.feed("abc ST") == ("abc ", False)
    assert m.feed("ay") == ("STay", False)
    assert m.flush() == ""


def test_generate_step_matches_greedy_argmax(tiny):
    model, tokenizer = tiny
    prompt = mx.array(tokenizer.encode("hello there"))
    tokens = [t for t, _ in generate_step(prompt, model, max_tokens=6)]
    seq = list(prompt.tolist())
    for t in tokens:
        assert mx.argmax(model(mx.array([seq]))[0, -1]).item() == t
        seq.append(t)


def test_stream_generate_records(tiny):
    model, tokenizer = tiny
    records = list(mlxllama.stream_generate(model, tokenizer, "the the", max_tokens=5))
    assert len(records) <= 5 and records[-1].finish_reason in ("length", "stop")
    assert all(r.finish_reason is None for r in records[:-1])
    assert records[-1].prompt_tokens == len(tokenizer.encode("the the"))
    assert records[-1].generation_tps > 0 and records[-1].peak_memory >= 0


def test_generate_text_equals_streamed_text(tiny):
    model, tokenizer = tiny
    text = mlxllama.generate(model, tokenizer, "in the", max_tokens=8)
    streamed = "".join(r.text for r in mlxllama.stream_generate(model, tokenizer, "in the", max_tokens=8))
    assert text == streamed


def test_stop_strings_end_generation(tiny):
    model, tokenizer = tiny
    full = mlxllama.generate(model, tokenizer, "er in", max_tokens=12)
    if len(full) < 3:
        pytest.skip("the random model stopped at once")
    stop = full[2:4]
    records = list(mlxllama.stream_generate(model, tokenizer, "er in", max_tokens=12, stop=[stop]))
    text = "".join(r.text for r in records)
    assert stop not in text and full.startswith(text) and records[-1].finish_reason == "stop"


def test_several_eos_ids_stop(tiny):
    model, tokenizer = tiny
    first = next(mlxllama.stream_generate(model, tokenizer, "hello", max_tokens=3)).token
    tokenizer.eos_token_ids = set(tokenizer.eos_token_ids) | {first, 299}
    try:
        records = list(mlxllama.stream_generate(model, tokenizer, "hello", max_tokens=3))
    finally:
        tokenizer.eos_token_ids = set(tokenizer.eos_token_ids) - {first, 299}
    assert len(records) == 1 and records[0].finish_reason == "stop" and records[0].text == ""


def test_seed_reproduces_sampled_text(tiny):
    model, tokenizer = tiny
    a = mlxllama.generate(model, tokenizer, "hello", max_tokens=10, temp=1.0, seed=42)
    b = mlxllama.generate(model, tokenizer, "hello", max_tokens=10, temp=1.0, seed=42)
    assert a == b


def test_batch_generate_equals_each_alone(tiny):
    model, tokenizer = tiny
    prompts = ["hello there", "in", "the other in er"]
    batch = mlxllama.batch_generate(model, tokenizer, prompts, max_tokens=6)
    alone = [mlxllama.generate(model, tokenizer, p, max_tokens=6) for p in prompts]
    assert batch == alone


def test_bad_inputs(tiny):
    model, tokenizer = tiny
    with pytest.raises(InputError, match="empty"):
        mlxllama.generate(model, tokenizer, "   ")
    with pytest.raises(InputError, match="context"):
        mlxllama.generate(model, tokenizer, list(range(3, 200)) * 4)
    with pytest.raises(InputError, match="top_p"):
        mlxllama.generate(model, tokenizer, "hi", top_p=2.0)


def test_max_kv_size_allows_long_generation(tiny):
    model, tokenizer = tiny
    text = mlxllama.generate(model, tokenizer, list(range(3, 200)) * 4, max_tokens=4, max_kv_size=64)
    assert isinstance(text, str)
