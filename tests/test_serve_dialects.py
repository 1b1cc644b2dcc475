"""The other API dialects (Anthropic Messages, OpenAI Responses, Ollama), CORS, /metrics and the
port check, through the official anthropic, openai and ollama clients against live servers."""

from __future__ import annotations

import mlxllama  # noqa: I001  (first: it loads the optimized BLAS before mlx.core)

import socket
import subprocess
import sys
import time

import anthropic
import httpx
import ollama
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlxllama.serve import create_app
from test_serve import KEY, MESSAGES, MODEL_ID, LiveServer, chat_tokens, client, greedy, server, tiny, tiny_dir  # noqa: F401

QUESTION = [{"role": "user", "content": "the cat sat on the mat"}]


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)  # sends x-api-key


@pytest.fixture(scope="module")
def olla(server):
    return ollama.Client(host=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def expected_chat(tiny, messages, n):
    return greedy(tiny, chat_tokens(tiny, messages), n)


# -- Anthropic ------------------------------------------------------------------------------------


def test_anthropic_messages_plain_and_streamed(tiny, claude):
    text, reason, n = expected_chat(tiny, MESSAGES, 12)
    r = claude.messages.create(model=MODEL_ID, max_tokens=12, system="be brief", messages=QUESTION)
    assert r.type == "message" and r.role == "assistant" and r.model == MODEL_ID
    assert [b.type for b in r.content] == ["text"] and r.content[0].text == text
    assert r.stop_reason == ("max_tokens" if reason == "length" else "end_turn")
    assert (r.usage.input_tokens, r.usage.output_tokens) == (len(chat_tokens(tiny, MESSAGES)), n)

    blocks = [{"type": "text", "text": "the cat sat "}, {"type": "text", "text": "on the mat"}]  # content blocks
    with claude.messages.stream(model=MODEL_ID, max_tokens=12, system=[{"type": "text", "text": "be brief"}],
                                messages=[{"role": "user", "content": blocks}]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [e.type for e in events]
    raw = [k for k in kinds if k in ("message_start", "content_block_start", "content_block_delta",
                                     "content_block_stop", "message_delta", "message_stop")]
    assert raw[0] == "message_start" and raw[1] == "content_block_start" and raw[-3:] == [
        "content_block_stop", "message_delta", "message_stop"]
    assert set(raw[2:-3]) <= {"content_block_delta"}
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == text
    assert final.content[0].text == text and final.usage.output_tokens == n


def test_anthropic_stop_sequence_and_count_tokens(tiny, claude):
    full, _, _ = expected_chat(tiny, MESSAGES, 24)
    stop = full[6:8]
    r = claude.messages.create(model=MODEL_ID, max_tokens=24, system="be brief", messages=QUESTION,
                               stop_sequences=[stop], metadata={"user_id": "u1"},
                               extra_body={"temperature": 0, "top_k": 5})  # older SDKs' fields
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == stop
    assert r.content[0].text == full[: full.find(stop)]
    count = claude.messages.count_tokens(model=MODEL_ID, system="be brief", messages=QUESTION)
    assert count.input_tokens == len(chat_tokens(tiny, MESSAGES))


def test_anthropic_errors(server, claude):
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL_ID, max_tokens=4, messages=QUESTION)
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="claude-none", max_tokens=4, messages=QUESTION)
    headers = {"x-api-key": KEY}
    for body, param in [({"messages": QUESTION}, "max_tokens"), ({"max_tokens": 4, "messages": "hi"}, "messages"),
                        ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image"}]}]}, None),
                        ({"max_tokens": 4, "messages": QUESTION, "temperature": 3}, "temperature"),
                        ({"max_tokens": 4, "messages": QUESTION, "output_config": {"format": {"type": "xml"}}},
                         "output_config")]:
        r = httpx.post(server.url + "/v1/messages", json=body, headers=headers)
        assert r.status_code == 400, r.text
        assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
        assert r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/messages", content=b"{nope", headers=headers)
    assert r.status_code == 400 and r.json()["type"] == "error"
    assert claude.messages.create(model=MODEL_ID, max_tokens=2, messages=QUESTION).usage.output_tokens >= 1


# -- OpenAI Responses --------------------------------------------------------------------------------


def test_responses_plain_and_streamed(tiny, client):
    text, reason, n = expected_chat(tiny, MESSAGES, 12)
    r = client.responses.create(model=MODEL_ID, instructions="be brief", input="the cat sat on the mat",
                                max_output_tokens=12)
    assert r.object == "response" and r.output_text == text
    assert r.status == ("incomplete" if reason == "length" else "completed")
    assert (r.usage.input_tokens, r.usage.output_tokens) == (len(chat_tokens(tiny, MESSAGES)), n)
    items = [{"role": "system", "content": "be brief"},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "the cat sat on the mat"}]}]
    events = list(client.responses.create(model=MODEL_ID, input=items, max_output_tokens=12, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == text
    assert events[-1].response.output_text == text
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_responses_errors(server, client):
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL_ID, input="hi", previous_response_id="resp_123")
    assert "previous_response_id" in str(info.value)
    headers = {"Authorization": f"Bearer {KEY}"}
    for body, param in [({"input": 5}, "input"), ({"input": [{"role": "user"}]}, "input[0].content"),
                        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens")]:
        r = httpx.post(server.url + "/v1/responses", json=body, headers=headers)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert client.responses.create(model=MODEL_ID, input="still there?", max_output_tokens=2).usage.output_tokens >= 1


# -- Ollama ----------------------------------------------------------------------------------------------


def test_ollama_chat_generate_list_show(tiny, olla):
    text, reason, n = expected_chat(tiny, MESSAGES, 12)
    r = olla.chat(model=MODEL_ID, messages=MESSAGES, options={"num_predict": 12, "temperature": 0}, keep_alive="5m")
    assert r.message.role == "assistant" and r.message.content == text
    assert r.done and r.done_reason == reason and r.eval_count == n
    assert r.prompt_eval_count == len(chat_tokens(tiny, MESSAGES))
    parts = list(olla.chat(model=MODEL_ID + ":latest", messages=MESSAGES, stream=True, options={"num_predict": 12}))
    assert "".join(p.message.content for p in parts) == text
    assert [p.done for p in parts][-1] is True and not any(p.done for p in parts[:-1])
    assert parts[-1].eval_count == n

    text, _, n = expected_chat(tiny, [{"role": "user", "content": "once upon a time"}], 8)
    g = olla.generate(model=MODEL_ID, prompt="once upon a time", options={"num_predict": 8})
    assert g.response == text and g.eval_count == n
    raw, _, _ = greedy(tiny, "once upon a time", 8)
    assert olla.generate(model=MODEL_ID, prompt="once upon a time", raw=True, options={"num_predict": 8}).response == raw
    assert "".join(p.response for p in olla.generate(model=MODEL_ID, prompt="once upon a time", stream=True,
                                                      options={"num_predict": 8})) == text

    models = olla.list().models
    assert [m.model for m in models] == [MODEL_ID + ":latest"] and models[0].details.family == "llama"
    shown = olla.show(MODEL_ID)
    assert shown.details.family == "llama" and "llama.context_length" in shown.modelinfo
    assert shown.template  # the chat template
    assert olla.ps().models[0].model == MODEL_ID + ":latest"


def test_ollama_errors(server, olla):
    with pytest.raises(ollama.ResponseError) as info:
        olla.chat(model="llama3", messages=MESSAGES)
    assert info.value.status_code == 404 and "llama3" in info.value.error
    headers = {"Authorization": f"Bearer {KEY}"}
    for path, body in [("/api/chat", {"model": MODEL_ID, "messages": 5}),
                       ("/api/chat", {"model": MODEL_ID, "messages": MESSAGES, "options": {"num_predict": "x"}}),
                       ("/api/chat", {"model": MODEL_ID, "messages": MESSAGES, "options": {"mirostat": 2}}),
                       ("/api/generate", {"model": MODEL_ID, "prompt": 5}), ("/api/show", {})]:
        r = httpx.post(server.url + path, json=body, headers=headers)
        assert r.status_code == 400 and isinstance(r.json()["error"], str) and set(r.json()) == {"error"}, r.text
    assert httpx.post(server.url + "/api/chat", json={"model": MODEL_ID}, headers={}).status_code == 401
    assert httpx.get(server.url + "/api/version").json()["version"]
    assert olla.chat(model=MODEL_ID, messages=MESSAGES, options={"num_predict": 2}).eval_count >= 1


# -- operations ---------------------------------------------------------------------------------------------


def test_cors(tiny_dir, server):
    model, tokenizer = mlxllama.load(tiny_dir)
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type,authorization"}
    with LiveServer(create_app(model, tokenizer, MODEL_ID, allowed_origins=["http://app.example"])) as live:
        ok = httpx.options(live.url + "/v1/chat/completions", headers={"Origin": "http://app.example", **preflight})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://app.example"
        denied = httpx.options(live.url + "/v1/chat/completions", headers={"Origin": "http://evil.example", **preflight})
        assert denied.status_code == 400 and "access-control-allow-origin" not in denied.headers
        r = httpx.get(live.url + "/v1/models", headers={"Origin": "http://app.example"})
        assert r.headers["access-control-allow-origin"] == "http://app.example"
    # without --allowed-origins: no CORS headers at all
    r = httpx.options(server.url + "/v1/chat/completions", headers={"Origin": "http://app.example", **preflight})
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    r = httpx.get(server.url + "/health", headers={"Origin": "http://app.example"})
    assert "access-control-allow-origin" not in r.headers


def metrics(url) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_metrics_parse_and_move(server, client):
    before = metrics(server.url)
    r = client.completions.create(model=MODEL_ID, prompt="count me", max_tokens=5)
    httpx.get(server.url + "/v1/nothing")
    after = metrics(server.url)
    key = "mlxllama_http_requests_total{method=POST,route=/v1/completions,status=200}"
    assert after[key] == before.get(key, 0) + 1
    assert after["mlxllama_http_requests_total{method=GET,route=unmatched,status=404}"] >= 1
    assert after["mlxllama_prompt_tokens_total"] - before.get("mlxllama_prompt_tokens_total", 0) == r.usage.prompt_tokens
    assert (after["mlxllama_generated_tokens_total"] - before.get("mlxllama_generated_tokens_total", 0)
            == r.usage.completion_tokens)
    assert after["mlxllama_prefill_tokens_per_second_count"] > before.get("mlxllama_prefill_tokens_per_second_count", 0)
    assert after["mlxllama_queue_depth"] == 0 and after["mlxllama_active_batch"] == 0


def test_port_in_use_is_one_line_before_loading(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        start = time.monotonic()
        # a model that does not exist: the port must be refused first, before any loading
        r = subprocess.run([sys.executable, "-m", "mlxllama", "serve", "--model", str(tmp_path / "nope"),
                            "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "already in use" in lines[0] and str(port) in lines[0], r.stderr
    assert time.monotonic() - start < 60


@pytest.mark.slow
def test_real_model_in_every_dialect_answers_greedily_by_default(default_model_dir):
    model, tokenizer = mlxllama.load(default_model_dir)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    with LiveServer(create_app(model, tokenizer, "smol")) as live:  # no temperature anywhere: greedy
        c = anthropic.Anthropic(base_url=live.url, api_key="unused", max_retries=0, timeout=120)
        answer = c.messages.create(model="smol", max_tokens=12, messages=question).content[0].text
        assert "Paris" in answer
        o = ollama.Client(host=live.url, timeout=120)
        assert o.chat(model="smol", messages=question, options={"num_predict": 12}).message.content == answer
        r = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=120)
        assert r.responses.create(model="smol", input=question[0]["content"], max_output_tokens=12).output_text == answer


def test_cli_ollama_flag_listens_on_11434_too(tiny_dir):
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 11434)) == 0:
            pytest.skip("port 11434 is taken on this machine")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlxllama", "serve", "--model", str(tiny_dir), "--port", str(port),
                             "--ollama", "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get("http://127.0.0.1:11434/api/version").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        names = [m.model for m in ollama.Client(host="http://127.0.0.1:11434").list().models]
        assert names == ["tiny:latest"]
        assert httpx.get(f"http://127.0.0.1:{port}/api/tags").json()["models"][0]["model"] == "tiny:latest"
    finally:
        proc.terminate()
        proc.wait(30)


WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 4}}, "required": ["city"]}}


def test_anthropic_tool_use_and_tool_result(claude):
    import importlib.util

    if importlib.util.find_spec("mlxllama.tools") is None:  # no tool calling in this build: refused, never ignored
        with pytest.raises(anthropic.BadRequestError):
            claude.messages.create(model=MODEL_ID, max_tokens=40, messages=QUESTION, tools=[WEATHER])
        return
    r = claude.messages.create(model=MODEL_ID, max_tokens=120, messages=QUESTION, tools=[WEATHER],
                               tool_choice={"type": "any"})  # must call: the call follows the schema
    assert r.stop_reason == "tool_use", r.content
    (use,) = [b for b in r.content if b.type == "tool_use"]
    assert use.name == "get_weather" and isinstance(use.input["city"], str)
    follow = [*QUESTION, {"role": "assistant", "content": r.content},
              {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}]
    after = claude.messages.create(model=MODEL_ID, max_tokens=5, messages=follow, tools=[WEATHER],
                                   tool_choice={"type": "none"})
    assert after.content[0].type == "text" and after.stop_reason in ("end_turn", "max_tokens")
    with claude.messages.stream(model=MODEL_ID, max_tokens=60, messages=QUESTION, tools=[WEATHER],
                                tool_choice={"type": "tool", "name": "get_weather"}) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[-1].type == "tool_use"
    assert final.content[-1].input == use.input or isinstance(final.content[-1].input["city"], str)
    n = claude.messages.count_tokens(model=MODEL_ID, messages=QUESTION, tools=[WEATHER]).input_tokens
    assert n > claude.messages.count_tokens(model=MODEL_ID, messages=QUESTION).input_tokens  # the tools are in the prompt


def test_structured_output_in_every_dialect(server, claude, client, olla):
    """A JSON schema through each dialect's own field: enforced where structured output is built in,
    else refused with that dialect's error, never ignored."""
    import importlib.util

    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
              "additionalProperties": False}
    asks = [
        lambda: client.responses.create(model=MODEL_ID, input="a number", max_output_tokens=30,
                                        text={"format": {"type": "json_schema", "name": "n", "schema": schema}}
                                        ).output_text,
        lambda: olla.chat(model=MODEL_ID, messages=QUESTION, format=schema, options={"num_predict": 30}).message.content,
        lambda: claude.messages.create(model=MODEL_ID, max_tokens=30, messages=QUESTION, extra_body={
            "output_config": {"format": {"type": "json_schema", "schema": schema}}}).content[0].text,
    ]
    errors = (openai.BadRequestError, ollama.ResponseError, anthropic.BadRequestError)
    for ask, error in zip(asks, errors):
        if importlib.util.find_spec("mlxllama.constrain") is None:
            with pytest.raises(error):
                ask()
        else:
            import json

            assert isinstance(json.loads(ask())["answer"], int)
