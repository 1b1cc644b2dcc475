"""One description of the generation options: the CLI's flags, the API's keyword checks and the
server's request checks all come from mlxllama.generation_options.OPTIONS."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import mlxllama
from mlxllama.chat import ChatSession
from mlxllama.cli import cli
from mlxllama.errors import InputError
from mlxllama.generation_options import OPTIONS, Range, check_options
from mlxllama.serve.schemas import APIError, parse_chat
from tinymodels import write_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return mlxllama.load(write_model(tmp_path_factory.mktemp("tiny"), "gqa_tied"))


def test_range_text_and_membership():
    assert Range(0, 1, lo_open=True).text() == "in (0, 1]" and 0 not in Range(0, 1, lo_open=True)
    assert Range(0, 1, hi_open=True).text() == "in [0, 1)" and 1 not in Range(0, 1, hi_open=True)
    assert Range(-2, 2).text() == "between -2 and 2" and Range(0, lo_open=True).text() == "> 0"
    assert Range(1).text() == ">= 1" and 1 in Range(1) and 0.5 not in Range(1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(tempp=0.5), "unknown generation option 'tempp' (did you mean 'temp'?)"),
    (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    (dict(temp=-1.0), "temperature must be >= 0, got -1.0"),
    (dict(top_k="5"), "top_k must be an integer, got '5'"),
    (dict(max_tokens=-1), "max_tokens must be >= 0, got -1"),
    (dict(presence_penalty=3), "presence_penalty must be between -2 and 2, got 3"),
    (dict(max_kv_size=4), "max_kv_size must be >= 8, got 4"),
    (dict(stop=[1]), "stop must be a str or a list of them, got [1]"),
])
def test_api_refuses_unknown_and_out_of_range_options_in_one_line(tiny, kwargs, message):
    model, tokenizer = tiny
    for call in (mlxllama.generate, mlxllama.stream_generate):
        with pytest.raises(InputError) as e:
            out = call(model, tokenizer, "hi", **kwargs)
            next(iter(out)) if call is mlxllama.stream_generate else None
        assert str(e.value) == message
    with pytest.raises(InputError, match="unknown generation option|must be"):
        mlxllama.batch_generate(model, tokenizer, ["hi"], **kwargs)


def test_valid_options_and_the_other_keywords_pass(tiny):
    model, tokenizer = tiny
    text = mlxllama.generate(model, tokenizer, "hi", max_tokens=2, temp=0.5, top_p=0.9, top_k=5, seed=1,
                             stop=["x"], prefill_step_size=8)
    assert isinstance(text, str)
    check_options({"verbose": True}, allowed={"verbose"})
    import numpy as np

    check_options({"max_tokens": np.int64(2), "temp": np.float32(0.5)})  # NumPy scalars are numbers too


def test_chat_session_checks_its_options(tiny):
    model, tokenizer = tiny
    with pytest.raises(InputError, match="unknown generation option 'top_n'"):
        ChatSession(model, tokenizer, top_n=3)


def test_cli_flags_defaults_and_ranges_come_from_the_description():
    out = CliRunner().invoke(cli, ["generate", "--help"], terminal_width=200).output
    for name, o in OPTIONS.items():
        if o.flags:
            assert o.flags[0] in out, name
    assert "[default: 256; x>=0]" in out and "[default: 1.0; 0<x<=1]" in out
    r = CliRunner().invoke(cli, ["generate", "--prompt", "x", "--min-p", "1"])
    assert r.exit_code == 2 and "0<=x<1" in r.output


def test_server_reads_each_option_under_all_its_field_names():
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert parse_chat({**body, "repeat_penalty": 1.3}, "m").repetition_penalty == 1.3
    assert parse_chat({**body, "temperature": 2}, "m").temperature == 2.0
    with pytest.raises(APIError) as e:
        parse_chat({**body, "temperature": 2.5}, "m")  # OpenAI's range, narrower than the library's
    assert (e.value.status, e.value.param) == (400, "temperature")
    with pytest.raises(APIError) as e:
        parse_chat({**body, "min_p": 1}, "m")
    assert e.value.param == "min_p"
    assert parse_chat(body, "m").top_p == OPTIONS["top_p"].default


def test_cli_batch_applies_penalties_and_refuses_what_it_cannot_do(tmp_path):
    model = str(write_model(tmp_path / "m", "gqa_tied"))
    base = ["generate", "--model", model, "--prompt", "hello", "--prompt", "world", "--max-tokens", "3",
            "--ignore-chat-template"]
    r = CliRunner().invoke(cli, base + ["--prompt-lookup", "2"])
    assert isinstance(r.exception, InputError) and "--prompt-lookup cannot be used with several prompts" in str(r.exception)
    r = CliRunner().invoke(cli, base + ["--repetition-penalty", "1.5", "--presence-penalty", "1"])
    assert r.exit_code == 0, r.output
    assert r.output.count("--- [") == 2
