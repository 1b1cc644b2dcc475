"""Server requests as clients send them: n choices, every sampling control, llama.cpp's fields,
model aliases, routes without /v1; driven by the official openai client against a live server."""

from __future__ import annotations

import mlxllama  # noqa: I001  (first: it loads the optimized BLAS before mlx.core)

import json

import httpx
import openai
import pytest

from mlxllama.generate import stream_generate
from mlxllama.serve import create_app
from test_serve import KEY, MESSAGES, MODEL_ID, LiveServer, chat_tokens, client, greedy, server, tiny, tiny_dir  # noqa: F401


def alone(tiny, prompt, max_tokens, **kwargs):
    """What the library's own generation says with these sampling settings."""
    model, tokenizer = tiny
    tokens = prompt if isinstance(prompt, list) else tokenizer.encode(prompt)
    return "".join(r.text for r in stream_generate(model, tokenizer, tokens, max_tokens=max_tokens, **kwargs))


def test_n_choices_greedy_are_identical_and_usage_counts_all(tiny, client):
    expected, reason, n = greedy(tiny, chat_tokens(tiny, MESSAGES), 10)
    r = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=10, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.message.content for c in r.choices] == [expected] * 3
    assert all(c.finish_reason == reason for c in r.choices)
    assert r.usage.prompt_tokens == len(chat_tokens(tiny, MESSAGES))
    assert r.usage.completion_tokens == 3 * n


def test_n_choices_seeded_are_reproducible_per_choice(client):
    kwargs = dict(model=MODEL_ID, prompt="roll the dice", max_tokens=8, temperature=1.0, seed=11)
    first = [c.text for c in client.completions.create(n=3, **kwargs).choices]
    again = [c.text for c in client.completions.create(n=3, **kwargs).choices]
    assert first == again
    assert len(set(first)) > 1  # each choice samples on its own
    assert client.completions.create(n=1, **kwargs).choices[0].text == first[0]  # choice 0 is what n=1 gives
    seed12 = client.completions.create(n=1, **{**kwargs, "seed": 12}).choices[0].text
    assert seed12 == first[1]  # choice i samples with seed + i


def test_n_choices_stream_reassembles(client):
    kwargs = dict(model=MODEL_ID, messages=MESSAGES, max_tokens=8, temperature=1.0, seed=5, n=2)
    whole = [c.message.content for c in client.chat.completions.create(**kwargs).choices]
    parts, reasons = {0: "", 1: ""}, {}
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    for chunk in chunks:
        for c in chunk.choices:
            parts[c.index] += c.delta.content or ""
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    assert [parts[0], parts[1]] == whole
    assert set(reasons) == {0, 1}
    assert chunks[-1].usage.completion_tokens > 0
    streamed = list(client.completions.create(model=MODEL_ID, prompt="abc", max_tokens=6, n=2, stream=True))
    assert {c.choices[0].index for c in streamed} == {0, 1}


def test_penalties_and_filters_match_the_library(tiny, client):
    prompt = "ab ab ab ab ab ab ab ab"  # repeated tokens: what the penalties act on
    plain = alone(tiny, prompt, 16)
    for fields, kwargs in [
        (dict(presence_penalty=1.5), dict(presence_penalty=1.5)),
        (dict(frequency_penalty=2.0), dict(frequency_penalty=2.0)),
        (dict(extra_body={"repetition_penalty": 1.8}), dict(repetition_penalty=1.8)),
        (dict(extra_body={"repeat_penalty": 1.8, "repeat_last_n": 4}), dict(repetition_penalty=1.8,
                                                                             repetition_context_size=4)),
    ]:
        expected = alone(tiny, prompt, 16, **kwargs)
        assert expected != plain, kwargs  # the setting changes the output ...
        r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=16, temperature=0, **fields)
        assert r.choices[0].text == expected, kwargs  # ... as the library's processor defines it
    # top_k=1 samples the most likely token: greedy, at any temperature
    r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=16, temperature=1.5, seed=3,
                                  extra_body={"top_k": 1})
    assert r.choices[0].text == plain
    r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=16, temperature=1.0, seed=3,
                                  extra_body={"min_p": 0.5, "top_k": 40})
    assert r.choices[0].text == alone(tiny, prompt, 16, temp=1.0, seed=3, min_p=0.5, top_k=40)


def test_llama_cpp_grammar_fields_are_enforced(server, client):
    """llama.cpp's `grammar` (GBNF) and `json_schema` constrain the output, never ignored."""
    headers = {"Authorization": f"Bearer {KEY}"}
    for seed in range(3):
        r = client.completions.create(model=MODEL_ID, prompt="Answer:", max_tokens=8, temperature=1.0, seed=seed,
                                      extra_body={"grammar": 'root ::= "yes" | "no"'})
        assert r.choices[0].text in ("yes", "no"), r.choices[0].text
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    r = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=40, temperature=1.0, seed=1,
                                       extra_body={"json_schema": schema})
    if r.choices[0].finish_reason == "stop":
        value = json.loads(r.choices[0].message.content)
        assert list(value) == ["n"] and isinstance(value["n"], int)
    else:  # cut by max_tokens: still a prefix of the grammar's language
        assert r.choices[0].message.content.startswith('{"n":')
    bad_bodies = [({"grammar": "root ::= missing", "prompt": "x"}, "grammar"),
                  ({"grammar": 'root ::= "a"', "json_schema": {"type": "object"}, "prompt": "x"}, "grammar"),
                  ({"json_schema": "not a schema", "prompt": "x"}, "json_schema"),
                  ({"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}, "prompt": "x"}, "grammar")]
    for body, param in bad_bodies:
        r = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": 2}, headers=headers)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


def test_llama_cpp_fields(tiny, server, client):
    headers = {"Authorization": f"Bearer {KEY}"}
    expected, _, n = greedy(tiny, "count", 5)
    body = {"prompt": "count", "n_predict": 5, "cache_prompt": True, "id_slot": 0, "temperature": 0}
    r = httpx.post(server.url + "/v1/completions", json=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected and r.json()["usage"]["completion_tokens"] == n
    for field, value in [("mirostat", 2), ("typical_p", 0.5), ("samplers", ["top_k"]), ("dry_multiplier", 0.8)]:
        r = httpx.post(server.url + "/v1/completions", json={**body, field: value}, headers=headers)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)
    # neutral values of fields we do not implement are fine
    r = httpx.post(server.url + "/v1/completions", json={**body, "mirostat": 0, "typical_p": 1.0}, headers=headers)
    assert r.status_code == 200
    # ignore_eos: generation runs to max_tokens (the tiny model otherwise stops early on some prompts)
    r = client.completions.create(model=MODEL_ID, prompt="x", max_tokens=40, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"


@pytest.fixture(scope="module")
def aliased(tiny_dir):
    model, tokenizer = mlxllama.load(tiny_dir)
    app = create_app(model, tokenizer, MODEL_ID, served_model_names=["gpt-4o-mini", "local"])
    with LiveServer(app) as live:
        yield live


def test_aliases_and_routes_without_v1(aliased, tiny):
    for base in (aliased.url + "/v1", aliased.url):  # llama.cpp's routes without /v1 too
        c = openai.OpenAI(base_url=base, api_key="x", max_retries=0, timeout=60)
        assert [m.id for m in c.models.list().data] == ["gpt-4o-mini", "local"]
        r = c.chat.completions.create(model="local", messages=MESSAGES, max_tokens=4)
        assert r.model == "local" and r.choices[0].message.content == greedy(tiny, chat_tokens(tiny, MESSAGES), 4)[0]
        assert c.completions.create(model="gpt-4o-mini", prompt="a", max_tokens=2).model == "gpt-4o-mini"
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=2)  # not one of the names


def test_accept_any_model(tiny_dir):
    model, tokenizer = mlxllama.load(tiny_dir)
    with LiveServer(create_app(model, tokenizer, MODEL_ID, accept_any_model=True)) as live:
        c = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = c.chat.completions.create(model="claude-or-whatever", messages=MESSAGES, max_tokens=2)
        assert r.model == MODEL_ID and r.usage.completion_tokens >= 1
        assert [m.id for m in c.models.list().data] == [MODEL_ID]


@pytest.mark.parametrize("overlap", [False, True])
def test_engine_rows_with_processors_match_the_library(tiny, overlap):
    """Rows with penalties beside plain rows, with the next step queued before tokens are handed
    out (the GPU order) or not: each row gets what the library gives it alone."""
    import asyncio

    from mlxllama.serve.engine import Delta, Engine, GenRequest

    model, tokenizer = tiny
    prompt = tokenizer.encode("ab ab ab ab ab ab")
    settings = [dict(), dict(presence_penalty=1.5), dict(frequency_penalty=2.0, repetition_penalty=1.3),
                dict(repetition_penalty=1.8, repetition_context_size=3)]
    expected = [alone(tiny, prompt, 12, **s) for s in settings]
    engine = Engine(model, tokenizer, max_batch=4, max_queue=4)
    engine.overlap = overlap
    engine.start()

    async def ask(s):
        job = engine.submit(GenRequest(prompt, 12, **s), asyncio.get_running_loop())
        return "".join([e.text async for e in job.events() if isinstance(e, Delta)])

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(ask(s) for s in settings)), 60)

    try:
        assert asyncio.run(main()) == expected
    finally:
        engine.stop()
