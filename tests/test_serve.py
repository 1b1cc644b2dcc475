"""`mlxllama serve` against live uvicorn servers on 127.0.0.1, driven by the official openai client."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlxllama  # noqa: I001  (first: it loads the optimized BLAS before mlx.core)

import httpx
import mlx.core as mx
import openai
import pytest
import uvicorn

from mlxllama.generate import stream_generate
from mlxllama.serve import create_app
from tinymodels import write_model

KEY = "test-key"
MODEL_ID = "tiny-served"


class LiveServer:
    """uvicorn in a background thread on a free loopback port; stopped on exit."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(20)
        self.sock.close()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random model whose greedy output depends on its whole context (weights scaled up so
    the text is not one repeated byte), with room for long generations."""
    path = write_model(tmp_path_factory.mktemp("serve") / "tiny", max_position_embeddings=1 << 16)
    weights = mx.load(str(path / "model.safetensors"))
    mx.save_safetensors(str(path / "model.safetensors"),
                        {k: v if "norm" in k else v * 10 for k, v in weights.items()}, metadata={"format": "mlx"})
    return path


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return mlxllama.load(tiny_dir)


@pytest.fixture(scope="module")
def server(tiny_dir):
    model, tokenizer = mlxllama.load(tiny_dir)
    app = create_app(model, tokenizer, MODEL_ID, api_key=KEY, max_batch=4, max_queue=8, max_body_bytes=64 * 1024,
                     default_temperature=0.0)
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def narrow(tiny_dir):
    """One slot and no queue: a second request while one runs gets 429."""
    model, tokenizer = mlxllama.load(tiny_dir)
    with LiveServer(create_app(model, tokenizer, MODEL_ID, max_batch=1, max_queue=0)) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy(tiny, prompt, max_tokens, stop=None):
    """What the model says alone: (text, finish_reason, generated tokens)."""
    model, tokenizer = tiny
    tokens = prompt if isinstance(prompt, list) else tokenizer.encode(prompt)
    text, last = "", None
    for last in stream_generate(model, tokenizer, tokens, max_tokens=max_tokens, stop=stop):
        text += last.text
    return text, last.finish_reason, last.generation_tokens


def chat_tokens(tiny, messages):
    return tiny[1].apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat sat on the mat"}]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("../../etc/passwd")
    r = httpx.get(server.url + "/health")  # no key needed
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_chat_matches_greedy_with_usage(tiny, client):
    expected, reason, n = greedy(tiny, chat_tokens(tiny, MESSAGES), 16)
    r = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=16)  # the server's default: 0
    assert r.object == "chat.completion" and r.model == MODEL_ID
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == reason
    assert r.usage.prompt_tokens == len(chat_tokens(tiny, MESSAGES))
    assert r.usage.completion_tokens == n
    assert r.usage.total_tokens == r.usage.prompt_tokens + n


def test_chat_stream_with_usage(tiny, client):
    expected, reason, n = greedy(tiny, chat_tokens(tiny, MESSAGES), 16)
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_completion_tokens=16,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_completions_stream_and_not(tiny, client):
    prompt = "once upon a time"
    expected, reason, n = greedy(tiny, prompt, 12)
    r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=12, temperature=0)
    assert r.object == "text_completion"
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, reason)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(tiny[1].encode(prompt)), n)
    chunks = list(client.completions.create(prompt=prompt, model=MODEL_ID, max_tokens=12, stream=True, temperature=0))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == reason
    # token ids as the prompt give the same answer
    r = client.completions.create(model=MODEL_ID, prompt=tiny[1].encode(prompt), max_tokens=12, temperature=0)
    assert r.choices[0].text == expected


def test_stop_sequences(tiny, client):
    prompt = "stop me if you can"
    full, _, _ = greedy(tiny, prompt, 24)
    stop = full[8:10]
    expected = full[: full.find(stop)]
    r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=24, temperature=0, stop=[stop, "never"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
    assert r.usage.completion_tokens < 24
    chunks = list(client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=24, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected


def test_logprobs(tiny, client):
    r = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) <= 6
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].token == item.token  # greedy: the chosen token is the most likely
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)
        assert item.logprob <= 0 and item.top_logprobs[1].logprob <= item.logprob
    r = client.completions.create(model=MODEL_ID, prompt="abc", max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(t) <= 2 for t in lp.top_logprobs)


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(model=MODEL_ID, prompt="roll the dice", max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    assert client.completions.create(**kwargs).choices[0].text == client.completions.create(**kwargs).choices[0].text


def test_concurrent_clients_get_their_own_answers(tiny, client):
    prompts = [f"request number {i} says {'hi ' * i}" for i in range(7)]  # more than max_batch=4
    expected = [greedy(tiny, p, 20)[0] for p in prompts]

    def ask(i):
        if i % 2:
            return client.completions.create(model=MODEL_ID, prompt=prompts[i], max_tokens=20, temperature=0).choices[0].text
        stream = client.completions.create(model=MODEL_ID, prompt=prompts[i], max_tokens=20, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in stream)

    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, range(len(prompts)), timeout=120))
    assert answers == expected


def long_stream(live, max_tokens=60000):
    """Opens a streamed completion that would run for a long time."""
    client = httpx.Client(timeout=30)
    body = {"prompt": "go on forever", "max_tokens": max_tokens, "stream": True, "temperature": 0,
            "logit_bias": {"2": -100}}  # never <|im_end|>, the end-of-sequence token
    cm = client.stream("POST", live.url + "/v1/completions", json=body)
    response = cm.__enter__()
    assert response.status_code == 200
    lines = response.iter_lines()  # kept alive: closing this iterator closes the connection
    assert next(lines).startswith("data:")  # it is running
    return client, cm, lines


def test_queue_overflow_gives_429_and_disconnect_frees_the_slot(narrow):
    client, cm, lines = long_stream(narrow)
    try:
        r = httpx.post(narrow.url + "/v1/completions", json={"prompt": "me too", "max_tokens": 2}, timeout=30)
        assert r.status_code == 429
        err = r.json()["error"]
        assert err["code"] == "rate_limit_exceeded" and set(err) == {"message", "type", "param", "code"}
        assert next(lines).startswith("data:") or next(lines).startswith("data:")  # still running
    finally:
        lines.close()
        cm.__exit__(None, None, None)  # the client goes away mid-stream
        client.close()
    deadline = time.monotonic() + 5
    while True:  # the slot frees as soon as the server sees the disconnect
        r = httpx.post(narrow.url + "/v1/completions", json={"prompt": "me too", "max_tokens": 2}, timeout=30)
        if r.status_code != 429 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert r.status_code == 200, r.text
    assert 1 <= r.json()["usage"]["completion_tokens"] <= 2
    assert httpx.get(narrow.url + "/health").json()["load"] == 0


def test_disconnect_while_waiting_for_a_whole_answer_frees_the_slot(narrow):
    body = {"prompt": "go on forever", "max_tokens": 60000, "logit_bias": {"2": -100}}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up on a non-streamed request
        httpx.post(narrow.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    deadline = time.monotonic() + 5
    while httpx.get(narrow.url + "/health").json()["load"] and time.monotonic() < deadline:
        time.sleep(0.05)
    r = httpx.post(narrow.url + "/v1/completions", json={"prompt": "next", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("batched, overlap", [(True, False), (True, True), (False, False)])
def test_engine_batches_match_sequences_alone(tiny, batched, overlap, monkeypatch):
    """The scheduler without HTTP: padded batches (and the one-call-per-sequence fallback) give
    every sequence what it gets alone, with prompts longer than one prefill chunk and of one token."""
    import asyncio

    from mlxllama.engine import core as engine_module
    from mlxllama.engine.batch import SeparateRows
    from mlxllama.serve.engine import Delta, Done, Engine, GenRequest

    if not batched:
        monkeypatch.setattr(engine_module, "make_batch", lambda model, quant=None: SeparateRows(model, quant))
    model, tokenizer = tiny
    prompts = [tokenizer.encode(p) for p in ["a", "short one", "a longer prompt " * 12, "x y z " * 3, "q"]]
    expected = [greedy(tiny, p, 12)[0] for p in prompts]
    engine = Engine(model, tokenizer, max_batch=3, max_queue=8, prefill_step=32)
    engine.overlap = overlap  # queue the next step before handing out tokens (the GPU order)
    engine.start()

    async def ask(i):
        await asyncio.sleep(0.005 * i)  # arrivals while others decode
        job = engine.submit(GenRequest(prompts[i], 12), asyncio.get_running_loop())
        text = ""
        async for event in job.events():
            if isinstance(event, Delta):
                text += event.text
            else:
                assert isinstance(event, Done)
        return text

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(ask(i) for i in range(len(prompts)))), 60)

    try:
        assert asyncio.run(main()) == expected
    finally:
        engine.stop()
    assert engine.load == 0


def test_api_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": MESSAGES}, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b"\xff\xfe\x00", 400, None),
    ({"messages": []}, 400, "messages"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"messages": MESSAGES, "n": 9}, 400, "n"),
    ({"messages": MESSAGES, "grammar": "root ::= missing"}, 400, "grammar"),
    ({"messages": MESSAGES, "json_schema": 5}, 400, "json_schema"),
    ({"messages": MESSAGES, "mirostat": 2}, 400, "mirostat"),
    ({"messages": MESSAGES, "min_p": 1}, 400, "min_p"),
    ({"messages": MESSAGES, "presence_penalty": 3}, 400, "presence_penalty"),
    ({"messages": MESSAGES, "max_tokens": -1}, 400, "max_tokens"),
    ({"messages": MESSAGES, "max_tokens": "ten"}, 400, "max_tokens"),
    ({"messages": MESSAGES, "temperature": "hot"}, 400, "temperature"),
    ({"messages": MESSAGES, "top_p": 0}, 400, "top_p"),
    ({"messages": MESSAGES, "stop": ["a", 1]}, 400, "stop"),
    ({"messages": MESSAGES, "stop": "s" * 1000}, 400, "stop"),
    ({"messages": MESSAGES, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"messages": MESSAGES, "top_logprobs": 3}, 400, "top_logprobs"),
    ({"messages": MESSAGES, "seed": 1 << 70}, 400, "seed"),
    ({"messages": MESSAGES, "logit_bias": {"999999": 5}}, 400, "logit_bias"),
    ({"messages": MESSAGES, "max_tokens": 1 << 20}, 400, "messages"),
    ({"messages": MESSAGES, "model": "/etc/passwd"}, 404, "model"),
    ({"messages": MESSAGES, "model": "../other-model"}, 404, "model"),
    ({"messages": [{"role": "user", "content": "x" * 70000}]}, 413, None),
])
def test_bad_requests_get_openai_errors(server, client, body, status, param):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/chat/completions", content=content, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if status == 400:
        assert error["type"] == "invalid_request_error"
    # and the server keeps serving
    assert client.completions.create(model=MODEL_ID, prompt="still there?", max_tokens=2).usage.completion_tokens >= 1


def test_loopback_server_refuses_other_host_names(tiny_dir):
    model, tokenizer = mlxllama.load(tiny_dir)
    from mlxllama.serve import LOOPBACK_NAMES

    with LiveServer(create_app(model, tokenizer, MODEL_ID, allowed_hosts=LOOPBACK_NAMES)) as live:
        assert httpx.get(live.url + "/health").status_code == 200
        assert httpx.get(f"http://localhost:{live.port}/health").status_code == 200
        r = httpx.get(live.url + "/v1/models", headers={"Host": "attacker.example:80"})  # DNS rebinding
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"


def test_completion_prompt_errors(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    for body, param in [({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [1, 10**9]}, "prompt"), ({}, "prompt"),
                        ({"prompt": "x", "logprobs": 9}, "logprobs"), ({"prompt": "x", "echo": True}, "echo")]:
        r = httpx.post(server.url + "/v1/completions", json=body, headers=headers)
        assert (r.status_code, r.json()["error"]["param"]) == (400, param)
    r = httpx.get(server.url + "/v1/nothing-here", headers=headers)
    assert r.status_code == 404 and r.json()["error"]["message"]


def test_cli_serves_until_terminated(tiny_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mlxllama", "serve", "--model", str(tiny_dir), "--port", str(port), "--api-key", "k",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny"]  # the folder's name
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3)
        assert 1 <= r.usage.completion_tokens <= 3
    finally:
        proc.terminate()
        rc = proc.wait(30)
    stderr = proc.stderr.read()
    assert rc in (0, -15), stderr  # uvicorn shuts down gracefully, then re-raises SIGTERM
    assert "terminate called" not in stderr and "Traceback" not in stderr


def test_cli_reports_a_missing_model_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mlxllama", "serve", "--model", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error:") and "nope" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_real_model_answers_over_http(default_model_dir):
    model, tokenizer = mlxllama.load(default_model_dir)
    with LiveServer(create_app(model, tokenizer, "smol")) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        r = client.chat.completions.create(model="smol", messages=messages, max_tokens=12, temperature=0)
        assert "Paris" in r.choices[0].message.content
        stream = client.chat.completions.create(model="smol", messages=messages, max_tokens=12, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == r.choices[0].message.content
