"""The server's prefix cache and KV budget: a conversation resent whole reuses its beginning
(usage.prompt_tokens_details.cached_tokens), answers equal cold ones, a hit is never corrupted by
the request using it; requests beyond --max-kv-bytes get 400 or 503 + Retry-After."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

import mlxllama
from mlxllama.engine import PrefixCache
from mlxllama.serve import create_app
from mlxllama.serve.engine import kv_bytes_per_token
from test_serve import LiveServer, chat_tokens, greedy  # noqa: F401  (fixtures below)
from tinymodels import scale_weights, write_model

MODEL_ID = "tiny-cached"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = write_model(tmp_path_factory.mktemp("serve-cache") / "tiny", "linear_rope_head_dim", max_position_embeddings=4096)
    return scale_weights(path, 8)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return mlxllama.load(tiny_dir)


def client_for(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


SYSTEM = {"role": "system", "content": "You are a careful assistant who answers briefly. " * 3}


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_second_turn_reuses_the_first(tiny, kv_bits):
    model, tokenizer = tiny
    cache = PrefixCache(64 << 20)
    kv = dict(kv_bits=kv_bits, kv_group_size=32)
    with LiveServer(create_app(model, tokenizer, MODEL_ID, default_temperature=0.0, prefix_cache=cache, **kv)) as live:
        client = client_for(live)
        messages = [SYSTEM, {"role": "user", "content": "the first question"}]
        r1 = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8)
        assert r1.usage.prompt_tokens_details.cached_tokens == 0
        messages += [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "and the second"}]
        r2 = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8)
        assert r2.usage.prompt_tokens_details.cached_tokens > len(chat_tokens(tiny, messages[:2])) // 2
        cold = [t for t in mlxllama.stream_generate(model, tokenizer, chat_tokens(tiny, messages), max_tokens=8,
                                                    kv_bits=kv_bits, kv_group_size=32)]
        assert r2.choices[0].message.content == "".join(c.text for c in cold)
        chunks = list(client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8, stream=True,
                                                     stream_options={"include_usage": True}))
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_hit_is_not_corrupted_by_the_request_that_used_it(tiny):
    model, tokenizer = tiny
    with LiveServer(create_app(model, tokenizer, MODEL_ID, default_temperature=0.0,
                               prefix_cache=PrefixCache(64 << 20))) as live:
        client = client_for(live)
        prompts = [[SYSTEM, {"role": "user", "content": q}] for q in ("one question", "another one", "one question")]
        expected = [greedy(tiny, chat_tokens(tiny, m), 10)[0] for m in prompts]
        got = [client.chat.completions.create(model=MODEL_ID, messages=m, max_tokens=10) for m in prompts]
        assert [r.choices[0].message.content for r in got] == expected
        assert got[1].usage.prompt_tokens_details.cached_tokens > 0  # the shared system prompt
        assert got[2].usage.prompt_tokens_details.cached_tokens > got[1].usage.prompt_tokens_details.cached_tokens


def test_kv_budget(tiny):
    model, tokenizer = tiny
    per_token = kv_bytes_per_token(model)
    with LiveServer(create_app(model, tokenizer, MODEL_ID, max_kv_bytes=per_token * 300)) as live:
        url = live.url + "/v1/completions"
        r = httpx.post(url, json={"prompt": "hi", "max_tokens": 400}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        body = {"prompt": "go on forever", "max_tokens": 250, "stream": True, "temperature": 0,
                "logit_bias": {"2": -100}}
        with httpx.Client(timeout=30) as c, c.stream("POST", url, json=body) as running:
            lines = running.iter_lines()
            assert next(lines).startswith("data:")
            r = httpx.post(url, json={"prompt": "me too", "max_tokens": 100}, timeout=30)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        deadline = time.monotonic() + 5
        while True:  # the reservation goes as soon as the server sees the client leave
            ok = httpx.post(url, json={"prompt": "me too", "max_tokens": 4}, timeout=30)
            if ok.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert ok.status_code == 200


def test_constrained_request_reuses_a_cached_prefix(tiny):
    """response_format constrains only the generated tokens: the prompt's cached prefix still serves."""
    model, tokenizer = tiny
    cache = PrefixCache(64 << 20)
    with LiveServer(create_app(model, tokenizer, MODEL_ID, default_temperature=0.0, prefix_cache=cache)) as live:
        client = client_for(live)
        messages = [SYSTEM, {"role": "user", "content": "answer yes or no"}]
        client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8)
        schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
                  "additionalProperties": False}
        r = client.chat.completions.create(
            model=MODEL_ID, messages=messages, max_tokens=24,
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
        assert r.usage.prompt_tokens_details.cached_tokens > len(chat_tokens(tiny, messages)) // 2
        assert json.loads(r.choices[0].message.content)["answer"] in ("yes", "no")
