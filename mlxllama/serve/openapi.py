"""GET /openapi.json: the server's routes as an OpenAPI 3.0 document.

The paths and methods come from the app's own routes; the OpenAI request bodies carry the fields
schemas.py reads, with the types and ranges it checks: the sampling fields straight from
generation_options.OPTIONS (the description the checks themselves use), the rest from the limits
schemas.py enforces (MAX_N, MAX_STOP, ...). The other dialects' bodies list their main fields.
Every operation documents its error body (OpenAI's, Anthropic's or Ollama's shape) as `default`.
"""

from __future__ import annotations

import copy
from typing import Any

from starlette.routing import Route

from ..generation_options import OPTIONS, Option
from . import schemas
from .fields import NO_OPS

JSON = "application/json"


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def option_schema(o: Option) -> dict[str, Any]:
    """A request field of one generation option: its type and the range the server accepts."""
    if o.name == "stop":
        text = {"type": "string", "maxLength": schemas.MAX_STOP_CHARS}
        return {"anyOf": [text, {"type": "array", "items": text, "maxItems": schemas.MAX_STOP}], "nullable": True,
                "description": "Stop sequences; the text stops before the first one."}
    if o.name == "logit_bias":
        r = o.request_range
        return {"type": "object", "nullable": True, "description": "Token id (as a string) -> bias added to its logit.",
                "additionalProperties": {"type": "number", "minimum": r.lo, "maximum": r.hi}}
    out: dict[str, Any] = {"type": "integer" if o.type is int else "number", "nullable": True, "description": o.help}
    r = o.request_range
    if r.lo is not None:
        out["minimum"] = r.lo
        if r.lo_open:
            out["exclusiveMinimum"] = True
    if r.hi is not None:
        out["maximum"] = r.hi
        if r.hi_open:
            out["exclusiveMaximum"] = True
    if o.default is not None:
        out["default"] = o.default
    return out


def sampling_properties() -> dict[str, Any]:
    """Every request field of every generation option, under each of its names."""
    props = {}
    for o in OPTIONS.values():
        for name in o.fields:
            props[name] = option_schema(o)
    return props


def _int(lo: int | None = None, hi: int | None = None, **extra) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "integer", "nullable": True, **extra}
    if lo is not None:
        out["minimum"] = lo
    if hi is not None:
        out["maximum"] = hi
    return out


BOOL = {"type": "boolean", "nullable": True}
OBJECT = {"type": "object"}
TEXT_PART = {"type": "object", "required": ["type", "text"],
             "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}
TOOL_CALL = {"type": "object", "required": ["function"], "properties": {
    "id": {"type": "string"}, "type": {"type": "string", "enum": ["function"]},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"}, "arguments": {"type": "string"}}}}}
CONTENT = {"anyOf": [{"type": "string"}, {"type": "array", "items": TEXT_PART}]}
MESSAGE = {"anyOf": [
    {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"type": "string", "enum": sorted(schemas.ROLES - {"tool"})}, "content": CONTENT,
        "name": {"type": "string"}, "tool_calls": {"type": "array", "items": TOOL_CALL}}},
    {"type": "object", "required": ["role", "content", "tool_call_id"], "properties": {
        "role": {"type": "string", "enum": ["tool"]}, "content": CONTENT, "tool_call_id": {"type": "string"}}}]}
NOT_BLANK = {"type": "string", "pattern": "\\S"}
TOOL = {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"type": "string", "enum": ["function"]},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"}, "description": {"type": "string"}, "parameters": OBJECT}}}}
RESPONSE_FORMAT = {"type": "object", "nullable": True, "required": ["type"], "properties": {
    "type": {"type": "string", "enum": ["text", "json_object", "json_schema"]},
    "json_schema": {"type": "object", "properties": {
        "name": {"type": "string"}, "schema": OBJECT, "strict": {"type": "boolean"}}}}}


IGNORED = "Also accepted and ignored: " + ", ".join(sorted(NO_OPS)) + "."


def common_request() -> dict[str, Any]:
    """The fields chat and completions share (schemas._common)."""
    return {
        "model": {"type": "string", "nullable": True, "description": "The served model's name (or an alias)."},
        "stream": BOOL,
        "stream_options": {"type": "object", "nullable": True, "description": "Only with stream: true.",
                           "properties": {"include_usage": BOOL}},
        "n": _int(1, schemas.MAX_N, description="Choices, decoded as rows of one batch."),
        "best_of": _int(1, 1),
        "ignore_eos": BOOL,
        "n_predict": _int(-1, description="llama.cpp: tokens to generate (-1: up to the context); not 0."),
        "repeat_last_n": _int(-1, description="llama.cpp: the repetition penalty's window (0: off, -1: all)."),
        "response_format": RESPONSE_FORMAT,
        "json_schema": {"type": "object", "nullable": True,
                        "description": "llama.cpp: a JSON schema the output follows (instead of response_format)."},
        "grammar": {"type": "string", "nullable": True,
                    "description": "llama.cpp: a GBNF grammar the output follows (instead of response_format)."},
        **sampling_properties(),
    }


def chat_request() -> dict[str, Any]:
    props = common_request()
    props.update({
        "messages": {"type": "array", "minItems": 1, "items": MESSAGE},
        "logprobs": BOOL,
        "top_logprobs": _int(0, schemas.MAX_TOP_LOGPROBS_CHAT, description="Needs logprobs: true."),
        "tools": {"type": "array", "nullable": True, "items": TOOL},
        "tool_choice": {"anyOf": [{"type": "string", "enum": ["auto", "none", "required"]}, OBJECT], "nullable": True},
        "parallel_tool_calls": BOOL,
    })
    return {"type": "object", "required": ["messages"], "properties": props, "description": IGNORED}


def completion_request() -> dict[str, Any]:
    props = common_request()
    del props["max_completion_tokens"]
    tokens = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
    props.update({
        "prompt": {"anyOf": [NOT_BLANK, tokens,
                             {"type": "array", "minItems": 1, "maxItems": 1,
                              "items": {"anyOf": [NOT_BLANK, tokens]}}],
                   "description": "Text, token ids, or a list holding one of these."},
        "logprobs": _int(0, schemas.MAX_LOGPROBS_COMPLETION),
    })
    return {"type": "object", "required": ["prompt"], "properties": props, "description": IGNORED}


USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"], "properties": {
    "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"},
    "prompt_tokens_details": {"type": "object", "properties": {"cached_tokens": {"type": "integer"}}}}}
FINISH = {"type": "string", "nullable": True, "enum": ["stop", "length", "tool_calls", None]}


def _completion_object(kind: str, choice: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"], "properties": {
        "id": {"type": "string"}, "object": {"type": "string", "enum": [kind]}, "created": {"type": "integer"},
        "model": {"type": "string"}, "system_fingerprint": {"type": "string", "nullable": True},
        "choices": {"type": "array", "items": choice}, "usage": USAGE}}


CHAT_COMPLETION = _completion_object("chat.completion", {
    "type": "object", "required": ["index", "message", "finish_reason"], "properties": {
        "index": {"type": "integer"}, "finish_reason": FINISH, "logprobs": {"type": "object", "nullable": True},
        "message": {"type": "object", "required": ["role"], "properties": {
            "role": {"type": "string", "enum": ["assistant"]}, "content": {"type": "string", "nullable": True},
            "refusal": {"type": "string", "nullable": True}, "tool_calls": {"type": "array", "items": TOOL_CALL}}}}})
TEXT_COMPLETION = _completion_object("text_completion", {
    "type": "object", "required": ["index", "text", "finish_reason"], "properties": {
        "index": {"type": "integer"}, "text": {"type": "string"}, "finish_reason": FINISH,
        "logprobs": {"type": "object", "nullable": True}}})
MODEL = {"type": "object", "required": ["id", "object", "created", "owned_by"], "properties": {
    "id": {"type": "string"}, "object": {"type": "string", "enum": ["model"]}, "created": {"type": "integer"},
    "owned_by": {"type": "string"}}}
MODEL_LIST = {"type": "object", "required": ["object", "data"], "properties": {
    "object": {"type": "string", "enum": ["list"]}, "data": {"type": "array", "items": ref("Model")}}}
ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": "string", "nullable": True},
        "code": {"type": "string", "nullable": True}}}}}
ANTHROPIC_ERROR = {"type": "object", "required": ["type", "error"], "properties": {
    "type": {"type": "string", "enum": ["error"]}, "error": {"type": "object", "required": ["type", "message"],
                                                            "properties": {"type": {"type": "string"},
                                                                           "message": {"type": "string"}}}}}
OLLAMA_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}

MESSAGES_REQUEST = {"type": "object", "required": ["messages", "max_tokens"], "properties": {
    "model": {"type": "string"}, "max_tokens": {"type": "integer", "minimum": 1},
    "messages": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role", "content"],
                                                           "properties": {"role": {"type": "string",
                                                                                   "enum": ["user", "assistant"]},
                                                                          "content": CONTENT}}},
    "system": {"anyOf": [{"type": "string"}, {"type": "array", "items": TEXT_PART}]},
    "stream": {"type": "boolean"}, "temperature": {"type": "number", "minimum": 0, "maximum": 1},
    "top_p": option_schema(OPTIONS["top_p"]), "top_k": option_schema(OPTIONS["top_k"]),
    "stop_sequences": {"type": "array", "items": {"type": "string"}, "maxItems": 16},
    "tools": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"}, "description": {"type": "string"}, "input_schema": OBJECT}}},
    "tool_choice": {"type": "object", "required": ["type"], "properties": {
        "type": {"type": "string", "enum": ["auto", "any", "tool", "none"]}, "name": {"type": "string"},
        "disable_parallel_tool_use": {"type": "boolean"}}},
    "output_config": OBJECT}}
COUNT_TOKENS_REQUEST = {**MESSAGES_REQUEST, "required": ["messages"]}
RESPONSES_REQUEST = {"type": "object", "required": ["input"], "properties": {
    "model": {"type": "string"}, "input": {"anyOf": [NOT_BLANK, {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["role", "content"], "properties": {
            "type": {"type": "string", "enum": ["message"]},
            "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]}, "content": CONTENT}}}]},
    "instructions": {"type": "string", "nullable": True}, "max_output_tokens": _int(1),
    "temperature": option_schema(OPTIONS["temp"]), "top_p": option_schema(OPTIONS["top_p"]),
    "stream": BOOL, "text": {"type": "object", "nullable": True, "properties": {"format": OBJECT}}}}
OLLAMA_OPTIONS = {"type": "object", "nullable": True, "properties": {
    "num_predict": {"type": "integer", "description": "-1: no limit, -2: fill the context, else >= 1"},
    "temperature": option_schema(OPTIONS["temp"]), "top_p": option_schema(OPTIONS["top_p"]),
    "top_k": option_schema(OPTIONS["top_k"]), "min_p": option_schema(OPTIONS["min_p"]),
    "seed": option_schema(OPTIONS["seed"]), "stop": option_schema(OPTIONS["stop"]),
    "repeat_penalty": option_schema(OPTIONS["repetition_penalty"]),
    "repeat_last_n": _int(-1), "presence_penalty": option_schema(OPTIONS["presence_penalty"]),
    "frequency_penalty": option_schema(OPTIONS["frequency_penalty"])}}
OLLAMA_CHAT_REQUEST = {"type": "object", "required": ["model"], "properties": {
    "model": {"type": "string"}, "messages": {"type": "array", "items": {
        "type": "object", "required": ["role", "content"], "properties": {
            "role": {"type": "string", "enum": ["system", "user", "assistant"]}, "content": {"type": "string"}}}},
    "stream": {"type": "boolean"}, "format": {"anyOf": [{"type": "string", "enum": ["json"]}, OBJECT]},
    "options": OLLAMA_OPTIONS, "keep_alive": {"anyOf": [{"type": "string"}, {"type": "number"}]}}}
OLLAMA_GENERATE_REQUEST = {"type": "object", "required": ["model"], "properties": {
    "model": {"type": "string"}, "prompt": {"type": "string"}, "system": {"type": "string"},
    "raw": {"type": "boolean"}, "stream": {"type": "boolean"},
    "format": {"anyOf": [{"type": "string", "enum": ["json"]}, OBJECT]},
    "options": OLLAMA_OPTIONS, "keep_alive": {"anyOf": [{"type": "string"}, {"type": "number"}]}}}
OLLAMA_SHOW_REQUEST = {"type": "object", "required": ["model"], "properties": {"model": {"type": "string"}, "name": {"type": "string"}}}
QA_REQUEST = {"type": "object", "required": ["documents", "question"], "properties": {
    "documents": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["text"], "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 256}, "text": NOT_BLANK}}},
    "question": NOT_BLANK, "extractive": {"type": "boolean"}, "max_tokens": {"type": "integer", "minimum": 1},
    "top_chunks": {"type": "integer", "minimum": 1}, "max_context": {"type": "integer", "minimum": 32},
    "temperature": option_schema(OPTIONS["temp"]), "seed": {"type": "integer"},
    "no_answer_threshold": {"anyOf": [{"type": "number"}, {"type": "string", "enum": ["auto", "off"]}]}}}

# path (without an OpenAI route's /v1) -> (summary, request body, 200 response body, its media types)
STREAMING = ("application/json", "text/event-stream")
OPERATIONS: dict[tuple[str, str], tuple[str, str | None, str | None, tuple[str, ...]]] = {
    ("GET", "/health"): ("Liveness, the served model and the engine's load", None, None, (JSON,)),
    ("GET", "/openapi.json"): ("This document", None, None, (JSON,)),
    ("GET", "/models"): ("The served model and its aliases (OpenAI)", None, "ModelList", (JSON,)),
    ("GET", "/models/{model_id}"): ("One served model (OpenAI)", None, "Model", (JSON,)),
    ("POST", "/chat/completions"): ("Chat completion (OpenAI)", "ChatCompletionRequest", "ChatCompletion", STREAMING),
    ("POST", "/completions"): ("Text completion (OpenAI)", "CompletionRequest", "TextCompletion", STREAMING),
    ("GET", "/metrics"): ("Prometheus metrics", None, None, ("text/plain",)),
    ("POST", "/v1/responses"): ("Responses API (OpenAI)", "ResponsesRequest", None, STREAMING),
    ("POST", "/v1/messages"): ("Messages API (Anthropic)", "MessagesRequest", None, STREAMING),
    ("POST", "/v1/messages/count_tokens"): ("Token count of a Messages request (Anthropic)", "CountTokensRequest",
                                            None, (JSON,)),
    ("GET", "/api/version"): ("Ollama: API version", None, None, (JSON,)),
    ("GET", "/api/tags"): ("Ollama: local models", None, None, (JSON,)),
    ("GET", "/api/ps"): ("Ollama: loaded models", None, None, (JSON,)),
    ("POST", "/api/show"): ("Ollama: model details", "OllamaShowRequest", None, (JSON,)),
    ("POST", "/api/chat"): ("Ollama: chat", "OllamaChatRequest", None, (JSON, "application/x-ndjson")),
    ("POST", "/api/generate"): ("Ollama: completion", "OllamaGenerateRequest", None, (JSON, "application/x-ndjson")),
    ("POST", "/v1/qa"): ("Questions about documents sent in the request", "QARequest", None, (JSON,)),
    ("GET", "/"): ("The chat page", None, None, ("text/html",)),
}
COMPONENTS = {
    "ChatCompletionRequest": chat_request(), "CompletionRequest": completion_request(),
    "ChatCompletion": CHAT_COMPLETION, "TextCompletion": TEXT_COMPLETION, "Model": MODEL, "ModelList": MODEL_LIST,
    "Error": ERROR, "AnthropicError": ANTHROPIC_ERROR, "OllamaError": OLLAMA_ERROR,
    "MessagesRequest": MESSAGES_REQUEST, "CountTokensRequest": COUNT_TOKENS_REQUEST,
    "ResponsesRequest": RESPONSES_REQUEST, "OllamaShowRequest": OLLAMA_SHOW_REQUEST,
    "OllamaChatRequest": OLLAMA_CHAT_REQUEST, "OllamaGenerateRequest": OLLAMA_GENERATE_REQUEST,
    "QARequest": QA_REQUEST,
}


def error_schema(path: str) -> str:
    """The error body's shape on `path`, as app.error_response chooses it."""
    return "AnthropicError" if path.startswith("/v1/messages") else "OllamaError" if path.startswith("/api/") else "Error"


def _path(route_path: str) -> str:
    return route_path.replace("{model_id:path}", "{model_id}")


def operation(method: str, path: str, auth: bool) -> dict[str, Any] | None:
    key = path[3:] if path.startswith("/v1/") and (method, path[3:]) in OPERATIONS else path
    if (method, key) not in OPERATIONS:
        return None
    summary, request, response, media = OPERATIONS[(method, key)]
    ok = {m: ({"schema": ref(response)} if response and m == JSON else {}) for m in media}
    op: dict[str, Any] = {"summary": summary, "operationId": f"{method.lower()}{path}".replace("/", "_"),
                          "responses": {"200": {"description": "OK", "content": ok},
                                        "default": {"description": "An error",
                                                    "content": {JSON: {"schema": ref(error_schema(path))}}}}}
    if request:
        op["requestBody"] = {"required": True, "content": {JSON: {"schema": ref(request)}}}
    if "{model_id}" in path:
        op["parameters"] = [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    if auth and path not in ("/health", "/openapi.json", "/") and not path.startswith("/metrics"):
        op["security"] = [{"bearer": []}, {"x-api-key": []}]
    return op


def components(names: list[str] | None, vocab_size: int | None) -> dict[str, Any]:
    """The schemas, with `model` fields naming the served model's names (None: any name is taken)
    and prompt token ids bounded by the vocabulary."""
    out = copy.deepcopy(COMPONENTS)
    for name, schema in out.items():
        if names and "model" in schema.get("properties", {}):
            schema["properties"]["model"] = {"type": "string", "enum": list(names)}
    if vocab_size:
        prompt = out["CompletionRequest"]["properties"]["prompt"]["anyOf"]
        prompt[1]["items"]["maximum"] = vocab_size - 1
        prompt[2]["items"]["anyOf"][1] = prompt[1]
    return out


def document(routes: list, title: str, version: str, auth: bool = False, names: list[str] | None = None,
             vocab_size: int | None = None) -> dict[str, Any]:
    """The OpenAPI document of these (Starlette) routes; auth: the server checks an API key;
    names: the model names requests may use (None: any); vocab_size: the token ids a prompt may hold."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route):
            continue  # the static files' mount
        path = _path(route.path)
        for method in sorted(route.methods or ()):
            if method == "HEAD":
                continue
            op = operation(method, path, auth)
            if op is not None:
                paths.setdefault(path, {})[method.lower()] = op
    doc: dict[str, Any] = {"openapi": "3.0.3", "info": {"title": title, "version": version}, "paths": paths,
                           "components": {"schemas": components(names, vocab_size)}}
    if auth:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"},
                                                "x-api-key": {"type": "apiKey", "in": "header", "name": "x-api-key"}}
    return doc
