"""GET /openapi.json, and schemathesis against a live server on a tiny random model: every request
the document allows gets no 5xx other than 503, and every answer matches the document."""

from __future__ import annotations

import mlxllama  # noqa: I001  (first: it loads the optimized BLAS before mlx.core)

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import content_type_conformance, response_schema_conformance, status_code_conformance

from mlxllama.generation_options import OPTIONS
from mlxllama.serve import create_app
from test_serve import KEY, LiveServer, server, tiny_dir  # noqa: F401  (server, tiny_dir: fixtures)
from tinymodels import write_model

# random requests per operation (half as many invalid ones) after the coverage phase's systematic ones
EXAMPLES = int(os.environ.get("MLXLLAMA_SCHEMATHESIS_EXAMPLES", 4))


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    path = write_model(tmp_path_factory.mktemp("openapi") / "tiny", max_position_embeddings=512)
    model, tokenizer = mlxllama.load(path)
    app = create_app(model, tokenizer, "tiny", max_batch=4, max_queue=8, max_body_bytes=64 * 1024,
                     default_max_tokens=8)
    with LiveServer(app) as server:
        yield server


def test_document_lists_every_route_with_its_methods(live):
    doc = httpx.get(f"{live.url}/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    for path, method in [("/v1/chat/completions", "post"), ("/chat/completions", "post"), ("/v1/completions", "post"),
                         ("/v1/models", "get"), ("/v1/models/{model_id}", "get"), ("/v1/messages", "post"),
                         ("/v1/responses", "post"), ("/api/chat", "post"), ("/api/generate", "post"),
                         ("/api/tags", "get"), ("/v1/qa", "post"), ("/health", "get"), ("/openapi.json", "get")]:
        assert method in doc["paths"][path], (path, method)
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    # the sampling fields carry the ranges the server checks, from the one description
    assert chat["temperature"]["minimum"] == 0 and chat["temperature"]["maximum"] == 2
    assert chat["top_p"]["exclusiveMinimum"] is True and chat["top_p"]["maximum"] == 1
    assert chat["min_p"]["exclusiveMaximum"] is True
    assert chat["repeat_penalty"] == chat["repetition_penalty"]
    assert chat["max_completion_tokens"]["minimum"] == OPTIONS["max_tokens"].server_range.lo == 1
    assert chat["n"]["maximum"] == 8 and chat["stop"]["anyOf"][1]["maxItems"] == 4


def test_document_needs_no_key_and_names_the_key_schemes(server):
    r = httpx.get(f"{server.url}/openapi.json")  # no key: the document is public, like /health
    assert r.status_code == 200
    doc = r.json()
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "x-api-key"}
    assert doc["paths"]["/v1/chat/completions"]["post"]["security"]
    assert "security" not in doc["paths"]["/health"]["get"]
    assert doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]["model"]["enum"] == ["tiny-served"]
    assert httpx.post(f"{server.url}/v1/chat/completions", json={}).status_code == 401


def test_server_checks_the_ranges_it_publishes(live):
    """A value just outside each published range is refused with a 400 naming the field."""
    props = httpx.get(f"{live.url}/openapi.json").json()["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty"):
        schema = props[name]
        for bound, step in (("minimum", -1), ("maximum", 1)):
            if bound not in schema:
                continue
            exclusive = schema.get("exclusive" + bound.capitalize(), False)
            value = schema[bound] if exclusive else schema[bound] + step * (1 if schema["type"] == "integer" else 0.01)
            r = httpx.post(f"{live.url}/v1/chat/completions",
                           json={"messages": [{"role": "user", "content": "hi"}], name: value, "max_tokens": 1})
            assert r.status_code == 400 and r.json()["error"]["param"] == name, (name, value, r.text)


def not_a_server_error_but_overload(response, case):
    """No 5xx, except 503 (overloaded: the client may retry)."""
    if response.status_code >= 500 and response.status_code != 503:
        raise AssertionError(f"{case.method} {case.path}: {response.status_code} {response.text[:300]}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`mlxllama serve` in its own process on a tiny random model: the URL it answers on."""
    import socket
    import subprocess
    import sys
    import time

    path = write_model(tmp_path_factory.mktemp("served") / "tiny", max_position_embeddings=512)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlxllama", "serve", "--model", str(path), "--port", str(port),
                             "--max-tokens", "8", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "Traceback" not in err, err[-3000:]  # nothing failed inside the server either


def test_schemathesis_coverage(served, tmp_path):
    """schemathesis's coverage phase (`schemathesis run --phases coverage`): for every operation,
    the edges of every field's range and type, valid and invalid; no 5xx but 503, and every answer
    as documented."""
    import subprocess
    import sys
    from pathlib import Path

    checks = "not_a_server_error_but_overload,response_schema_conformance,status_code_conformance," \
             "content_type_conformance"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks", "PYTHONPATH": str(Path(__file__).parent)}
    r = subprocess.run([str(Path(sys.executable).with_name("schemathesis")), "run", f"{served}/openapi.json",
                        "--phases", "coverage", "--checks", checks, "--request-timeout", "30", "--no-color",
                        # the OpenAI routes without /v1 are the same handlers as those with it
                        "--exclude-path-regex", "^/(chat/completions|completions|models.*)$"],
                       capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "generated" in r.stdout


def test_schemathesis(live):
    """Every operation of the document, EXAMPLES generated requests each (schemathesis's positive
    mode: bodies valid under the document, at the edges of the ranges too)."""
    api = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 20
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        def check(case):
            response = case.call(base_url=live.url, timeout=30)
            not_a_server_error_but_overload(response, case)
            case.validate_response(response, checks=[response_schema_conformance, status_code_conformance,
                                                     content_type_conformance])

        check()


def test_schemathesis_negative(live):
    """Requests the document does not allow (wrong types, values out of range, missing fields):
    each is answered without a 5xx other than 503."""
    api = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    for operation in [result.ok() for result in api.get_all_operations()]:
        if not list(operation.iter_parameters()) and not operation.body:
            continue  # nothing to get wrong
        @given(case=operation.as_strategy(GenerationMode.NEGATIVE))
        @settings(max_examples=max(1, EXAMPLES // 2), deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        def check(case):
            not_a_server_error_but_overload(case.call(base_url=live.url, timeout=30), case)

        try:
            check()
        except Unsatisfiable:  # no invalid value exists (a path parameter that takes any string)
            assert operation.path == "/models/{model_id}" or operation.path.endswith("/models/{model_id}")


def test_what_schemathesis_found(live):
    """Requests that once got a 500 (or failed every request in the batch)."""
    chat = f"{live.url}/v1/chat/completions"
    r = httpx.post(chat, json={"messages": [{"role": {}, "content": "x"}]})  # an unhashable role
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"
    # a tiny penalty makes logits infinite: the log probabilities stay JSON numbers
    r = httpx.post(f"{live.url}/v1/completions", json={"prompt": "0", "repetition_penalty": 5e-324, "logprobs": 2,
                                                        "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert all(lp == lp and abs(lp) != float("inf") for lp in r.json()["choices"][0]["logprobs"]["token_logprobs"])
    # a repetition window far past the start of the text is the whole text
    r = httpx.post(chat, json={"messages": [{"role": "user", "content": "x"}], "repetition_penalty": 1.2,
                               "repetition_context_size": 1 << 40, "max_tokens": 2})
    assert r.status_code == 200, r.text
