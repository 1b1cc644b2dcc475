"""response_format and tool calling over HTTP, driven by the official openai client."""

from __future__ import annotations

import json

import mlxllama  # noqa: I001  (first: it loads the optimized BLAS before mlx.core)

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from mlxllama.serve import create_app
from mlxllama.tools import FORMATS, CallStream, call_grammar, parse_calls, template_messages
from test_serve import LiveServer
from tinymodels import write_model

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Adds two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -999, "maximum": 999},
                                                    "b": {"type": "integer", "minimum": -999, "maximum": 999}},
                   "required": ["a", "b"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class City(BaseModel):
    name: str = Field(max_length=16)
    country: str = Field(max_length=16)
    million_people: int = Field(ge=0, le=40)


@pytest.fixture(scope="module")
def smol_server(default_model_dir):
    model, tokenizer = mlxllama.load(default_model_dir)
    app = create_app(model, tokenizer, "smol", max_batch=4, default_temperature=0.0, default_max_tokens=64)
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def client(smol_server):
    return openai.OpenAI(base_url=smol_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.mark.slow
def test_parse_with_a_pydantic_model(client):
    r = client.chat.completions.parse(model="smol", messages=[{"role": "user", "content": "Tell me about Paris."}],
                                      response_format=City, max_tokens=60)
    city = r.choices[0].message.parsed
    assert isinstance(city, City) and city.name and r.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_json_object_and_completions_json_schema(client):
    r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "A JSON object about a cat."}],
                                       response_format={"type": "json_object"}, max_tokens=40, temperature=0)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: still the beginning of an object
        assert r.choices[0].message.content.startswith("{")
    schema = City.model_json_schema() | {"additionalProperties": False}
    r = client.completions.create(model="smol", prompt="A city as JSON:", max_tokens=60, temperature=0, extra_body={
        "response_format": {"type": "json_schema", "json_schema": {"name": "City", "schema": schema, "strict": True}}})
    jsonschema.validate(json.loads(r.choices[0].text), schema)


@pytest.mark.slow
def test_tool_loop_required_call_then_final_answer(client):
    r = client.chat.completions.create(model="smol", messages=ASK, tools=[WEATHER, ADD], tool_choice="required",
                                       max_tokens=48, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    schema = {"get_weather": WEATHER, "add": ADD}[call.function.name]["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)
    assert call.id.startswith("call_") and call.type == "function"
    # the result goes back as a tool message; the model answers in words
    result = {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})}
    messages = ASK + [choice.message.model_dump(exclude_none=True), result]
    final = client.chat.completions.create(model="smol", messages=messages, tools=[WEATHER, ADD], tool_choice="none",
                                           max_tokens=40, temperature=0)
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].message.content.strip() and final.choices[0].finish_reason in ("stop", "length")


@pytest.mark.slow
def test_auto_gives_text_or_a_valid_call(client):
    for question in ("What is the weather in Paris?", "Say hello."):
        r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": question}],
                                           tools=[WEATHER], max_tokens=40, temperature=0)
        message = r.choices[0].message
        if message.tool_calls:
            assert r.choices[0].finish_reason == "tool_calls"
            jsonschema.validate(json.loads(message.tool_calls[0].function.arguments),
                                WEATHER["function"]["parameters"])
        else:
            assert message.content and not message.content.lstrip().startswith("{")


@pytest.mark.slow
def test_named_tool_choice_and_streamed_calls_reassemble(client):
    named = {"type": "function", "function": {"name": "add"}}
    ask = [{"role": "user", "content": "What is 12 plus 30?"}]
    whole = client.chat.completions.create(model="smol", messages=ask, tools=[WEATHER, ADD], tool_choice=named,
                                           max_tokens=40, temperature=0)
    call = whole.choices[0].message.tool_calls[0]
    assert call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), ADD["function"]["parameters"])
    stream = client.chat.completions.create(model="smol", messages=ask, tools=[WEATHER, ADD], tool_choice=named,
                                            max_tokens=40, temperature=0, stream=True)
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in stream:
        delta = chunk.choices[0].delta
        reasons.append(chunk.choices[0].finish_reason)
        assert not delta.content
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = tc.id or entry["id"]
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
    assert reasons[-1] == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [(call.function.name, json.loads(call.function.arguments))]
    assert calls[0]["id"].startswith("call_")


@pytest.mark.slow
@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format", "strin"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "format": "no-such-format"}}}}, "response_format", "no-such-format"),
    ({"response_format": {"type": "yaml"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "schema"),
    ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "strin"}}}],
      "tool_choice": "required"}, "tools", "strin"),
    ({"tools": [{"type": "function"}]}, "tools", "name"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format", "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls", "boolean"),
])
def test_bad_formats_and_tools_get_400(smol_server, body, param, words):
    r = httpx.post(smol_server.url + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, **body},
                   timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


# -- the tool-call syntax of each family, without a model ----------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return mlxllama.load(write_model(tmp_path_factory.mktemp("tools") / "tiny"))


@pytest.mark.parametrize("name, text", [
    ("hermes", 'Let me check.<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'),
    ("mistral", '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]'),
    ("llama3", '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}'),
    ("json", '{"name": "add", "arguments": {"a": 1, "b": 2}}'),
])
def test_each_family_parses_and_streams_the_same_call(name, text):
    fmt = FORMATS[name]
    content, calls = parse_calls(text, fmt, [ADD])
    assert [(c.name, c.arguments) for c in calls] == [("add", {"a": 1, "b": 2})]
    assert content == ("Let me check." if name == "hermes" else "")
    stream = CallStream(fmt, [ADD])
    sent = "".join(stream.feed(text[i : i + 3]) for i in range(0, len(text), 3))
    rest, streamed = stream.finish()
    assert (sent + rest).strip() == content and [(c.name, c.arguments) for c in streamed] == [("add", {"a": 1, "b": 2})]


def test_text_and_unknown_tools_stay_content():
    assert parse_calls("Paris is sunny.", FORMATS["json"], [ADD]) == ("Paris is sunny.", [])
    text = '{"name": "delete_everything", "arguments": {}}'
    assert parse_calls(text, FORMATS["json"], [ADD]) == (text, [])
    stream = CallStream(FORMATS["hermes"], [ADD])
    assert stream.feed("Hello <tool") == "Hello " and stream.feed("kit>") == "<toolkit>"


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("required", [True, False])
def test_call_grammars_compile_and_constrain_a_random_model(tiny, name, required):
    """A random model under the required-call grammar writes a call that parses and validates."""
    from mlxllama import generate
    from mlxllama.constrain import Constraint, lark

    model, tokenizer = tiny
    grammar = call_grammar([WEATHER, ADD], FORMATS[name], tokenizer, required=required)
    constraint = Constraint(lark(grammar), tokenizer)
    if not required:
        return  # compiling is the check: free text is allowed
    out = generate(model, tokenizer, "x", max_tokens=400, temp=1.0, seed=1, response_format=constraint)
    _, calls = parse_calls(out, FORMATS[name], [WEATHER, ADD])
    assert len(calls) >= 1, out
    for c in calls:
        schema = {"get_weather": WEATHER, "add": ADD}[c.name]["function"]["parameters"]
        jsonschema.validate(c.arguments, schema)


def test_template_without_tools_gets_them_in_the_system_message(tiny):
    _, tokenizer = tiny
    history = ASK + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    messages, extra = template_messages(history, [WEATHER], tokenizer)
    assert extra == {} and messages[0]["role"] == "system" and "get_weather" in messages[0]["content"]
    assert messages[2]["content"] == '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert messages[3]["role"] == "tool" and messages[3]["name"] == "get_weather"
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
    assert "21 C" in text and "get_weather" in text


@pytest.mark.slow
def test_n_choices_each_follow_the_schema_and_the_tools(client):
    schema = City.model_json_schema() | {"additionalProperties": False}
    r = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Tell me about a city."}], n=3, max_tokens=60,
        temperature=1.0, seed=4,
        response_format={"type": "json_schema", "json_schema": {"name": "City", "schema": schema, "strict": True}})
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.message.content), schema)
        else:
            assert c.message.content.startswith("{")
    r = client.chat.completions.create(model="smol", messages=ASK, tools=[WEATHER, ADD], tool_choice="required",
                                       n=2, max_tokens=48, temperature=1.0, seed=7)
    assert len(r.choices) == 2
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.tool_calls
        call = c.message.tool_calls[0]
        assert call.function.name in ("get_weather", "add")
        args = json.loads(call.function.arguments)
        params = (WEATHER if call.function.name == "get_weather" else ADD)["function"]["parameters"]
        jsonschema.validate(args, params)
