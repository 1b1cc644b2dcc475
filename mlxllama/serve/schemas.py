"""Request bodies of the OpenAI API, checked field by field.

`parse_chat` and `parse_completion` turn a decoded JSON body into a `Parsed` record or raise
`APIError` (400 with the offending field as `param`). Nothing here touches the model or the
tokenizer; `prompts.py` turns the record into token ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..generation_options import OPTIONS
from .fields import GRAMMAR_FIELDS, refused_field

MAX_N = 8  # choices per request (each one a row of the batch)
MAX_STOP = 4  # the API's limit on stop sequences
MAX_STOP_CHARS = 256  # matching costs grow with the square of a stop sequence's length
MAX_TOP_LOGPROBS_CHAT = 20
MAX_LOGPROBS_COMPLETION = 5
ROLES = {"system", "developer", "user", "assistant", "tool"}


class APIError(Exception):
    """An error answered with the OpenAI error body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class Parsed:
    """What a request asks for, before tokenization."""

    kind: str  # "chat" or "completion"
    messages: list[dict[str, Any]] | None = None  # chat
    prompt: str | list[int] | None = None  # completion: text or token ids
    max_tokens: int | None = None  # None: the server's default
    temperature: float | None = None  # None: the server's default
    top_p: float = OPTIONS["top_p"].default
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: off; k: the chosen token plus k alternatives
    logit_bias: dict[int, float] | None = None
    n: int = 1  # choices, decoded as rows of one batch
    top_k: int = OPTIONS["top_k"].default
    min_p: float = OPTIONS["min_p"].default
    presence_penalty: float = OPTIONS["presence_penalty"].default
    frequency_penalty: float = OPTIONS["frequency_penalty"].default
    repetition_penalty: float | None = OPTIONS["repetition_penalty"].default
    repetition_context_size: int = OPTIONS["repetition_context_size"].default
    ignore_eos: bool = False
    model: str | None = None  # the name the request used, echoed in the response

    response_format: dict[str, Any] | None = None  # json_object / json_schema; None: free text
    tools: list[dict[str, Any]] | None = None  # OpenAI function tools (chat)
    tool_choice: str | dict[str, Any] = "auto"  # "auto", "none", "required" or {"name": ...}
    parallel_tool_calls: bool = True

class ModelNames:
    """The names the served model answers to: the first is its id, then aliases; accept_any: every
    name is taken as the served model (for tools that hard-code one)."""

    def __init__(self, names: Iterable[str], accept_any: bool = False):
        self.names = list(dict.fromkeys(names))
        if not self.names:
            raise ValueError("the served model needs a name")
        self.accept_any = accept_any

    @property
    def primary(self) -> str:
        return self.names[0]

    def __contains__(self, name: object) -> bool:
        return self.accept_any or name in self.names

    def __iter__(self):
        return iter(self.names)

    def __str__(self) -> str:
        return ", ".join(f"'{n}'" for n in self.names)


def model_names(served: "str | ModelNames") -> ModelNames:
    return served if isinstance(served, ModelNames) else ModelNames([served])


# ---------------------------------------------------------------------------------------------
# Field checkers: each returns the value or raises a 400 naming the field.


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _int(body: dict, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v):
        raise bad(name, f"'{name}' must be an integer, got {type(v).__name__}", "invalid_type")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise bad(name, f"'{name}' must be {bounds}, got {v}")
    return v


def _number(body: dict, name: str, default: float | None, lo: float, hi: float, lo_open: bool = False,
            hi_open: bool = False) -> float | None:
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v):
        raise bad(name, f"'{name}' must be a number", "invalid_type")
    if v > hi or v < lo or (lo_open and v == lo) or (hi_open and v == hi):
        raise bad(name, f"'{name}' must be {'>' if lo_open else '>='} {lo} and {'<' if hi_open else '<='} {hi}, got {v}")
    return float(v)


def option_field(body: dict, option: str, default: Any = ...) -> Any:
    """A sampling field, read under each of its names (generation_options.OPTIONS[option].fields)
    and checked against its request range; `default` (else the option's) when none is set."""
    o = OPTIONS[option]
    r = o.request_range
    for name in o.fields:
        if o.type is int:
            v = _int(body, name, r.lo, r.hi)
        else:
            v = _number(body, name, None, -math.inf if r.lo is None else float(r.lo),
                        math.inf if r.hi is None else float(r.hi), r.lo_open, r.hi_open)
        if v is not None:
            return v
    return o.default if default is ... else default


def _bool(body: dict, name: str) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(name, f"'{name}' must be a boolean", "invalid_type")
    return v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad("stop", "'stop' must be a string or a list of strings", "invalid_type")
    if len(v) > MAX_STOP:
        raise bad("stop", f"'stop' may hold at most {MAX_STOP} sequences, got {len(v)}")
    if any(len(s) > MAX_STOP_CHARS for s in v):
        raise bad("stop", f"stop sequences may be at most {MAX_STOP_CHARS} characters long")
    return [s for s in v if s]


def _logit_bias(body: dict) -> dict[int, float] | None:
    v = body.get("logit_bias")
    if v is None or v == {}:
        return None
    if not isinstance(v, dict):
        raise bad("logit_bias", "'logit_bias' must map token ids to numbers", "invalid_type")
    out = {}
    for k, b in v.items():
        try:
            token = int(k)
        except (TypeError, ValueError):
            raise bad("logit_bias", f"'logit_bias' key {k!r} is not a token id") from None
        if not _is_number(b) or b not in OPTIONS["logit_bias"].request_range:
            raise bad("logit_bias", "'logit_bias' values must be numbers "
                      f"{OPTIONS['logit_bias'].request_range.text()}, got {b!r}")
        out[token] = float(b)
    return out


def _model(body: dict, served: "str | ModelNames") -> str | None:
    v = body.get("model")
    if v is None:
        return None
    if not isinstance(v, str):
        raise bad("model", "'model' must be a string", "invalid_type")
    names = model_names(served)
    if v not in names:
        # Never a path or another name: the server runs only the model it was started with.
        raise APIError(404, f"The model '{v[:200]}' does not exist; this server serves {names}",
                       param="model", code="model_not_found")
    return v if v in names.names else names.primary


def _unsupported(body: dict) -> None:
    """Fields this server does not implement, when set to anything but their neutral value."""
    if _int(body, "best_of", 1, None) not in (None, 1):
        raise bad("best_of", "only best_of=1 is supported")
    name = refused_field(body)
    if name is not None:
        raise bad(name, f"'{name}' is not supported by this server; leave it out or at its neutral value",
                  "unsupported_parameter")
    if body.get("functions"):
        raise bad("functions", "the legacy 'functions' field is not supported: use 'tools'", "unsupported_parameter")
    if body.get("echo"):
        raise bad("echo", "echo is not supported by this server", "unsupported_parameter")
    if body.get("suffix"):
        raise bad("suffix", "suffix is not supported by this server", "unsupported_parameter")


def _penalties(body: dict) -> dict[str, Any]:
    """top_k, min_p and the penalties, under OpenAI's, vLLM's and llama.cpp's names."""
    top_k = option_field(body, "top_k")
    repetition = option_field(body, "repetition_penalty")
    context = option_field(body, "repetition_context_size", None)
    if context is None:
        last_n = _int(body, "repeat_last_n", -1, None)  # llama.cpp: 0 turns the penalty off, -1 the whole context
        if last_n == 0:
            repetition = None
        context = (1 << 30) if last_n == -1 else last_n
    return dict(
        top_k=max(top_k, 0),
        min_p=option_field(body, "min_p"),
        presence_penalty=option_field(body, "presence_penalty"),
        frequency_penalty=option_field(body, "frequency_penalty"),
        repetition_penalty=repetition,
        repetition_context_size=context or OPTIONS["repetition_context_size"].default,
        ignore_eos=_bool(body, "ignore_eos"),
    )


def _max_tokens(body: dict, *names: str) -> int | None:
    """The first of `names` that is set; llama.cpp's n_predict after them (-1: up to the context)."""
    for name in names:
        v = _int(body, name, OPTIONS["max_tokens"].request_range.lo)
        if v is not None:
            return v
    n_predict = _int(body, "n_predict", -1)
    if n_predict == 0:
        raise bad("n_predict", "'n_predict' must be -1 (up to the context) or >= 1, got 0")
    return n_predict


def _common(body: Any, served: "str | ModelNames", kind: str) -> Parsed:
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object", "invalid_json")
    model = _model(body, served)
    _unsupported(body)
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("stream_options", "'stream_options' is only allowed when 'stream' is true")
        if not isinstance(options, dict):
            raise bad("stream_options", "'stream_options' must be an object", "invalid_type")
        include_usage = _bool(options, "include_usage")
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed):
            raise bad("seed", "'seed' must be an integer", "invalid_type")
        if seed not in OPTIONS["seed"].request_range:
            raise bad("seed", "'seed' must fit in 64 bits")
        seed %= 1 << 64
    return Parsed(
        kind=kind,
        response_format=_response_format(body),
        temperature=option_field(body, "temp", None),
        top_p=option_field(body, "top_p"),
        seed=seed,
        stop=_stop(body),
        stream=stream,
        include_usage=include_usage,
        logit_bias=_logit_bias(body),
        n=_int(body, "n", 1, MAX_N) or 1,
        model=model,
        **_penalties(body),
    )


def _grammar_field(body: dict) -> dict[str, Any] | None:
    """llama.cpp's `json_schema` (a JSON schema) or `grammar` (GBNF text), as a response format."""
    given = [name for name in GRAMMAR_FIELDS if body.get(name) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise bad(given[1], "either 'json_schema' or 'grammar' can be given, not both")
    if body.get("response_format") is not None:
        raise bad(given[0], f"either 'response_format' or '{given[0]}' can be given, not both")
    v = body[given[0]]
    if given[0] == "json_schema":
        if not isinstance(v, (dict, bool)):
            raise bad("json_schema", "'json_schema' must be a JSON schema object", "invalid_type")
        return {"type": "json_schema", "json_schema": {"name": None, "schema": v, "strict": True},
                "field": "json_schema"}
    if not isinstance(v, str) or not v.strip():
        raise bad("grammar", "'grammar' must be a non-empty GBNF grammar", "invalid_type")
    return {"type": "gbnf", "grammar": v, "field": "grammar"}


def _response_format(body: dict) -> dict[str, Any] | None:
    """`response_format`: text (None), json_object, or json_schema {name, schema, strict}; or
    llama.cpp's `json_schema` / `grammar` fields."""
    grammar = _grammar_field(body)
    if grammar is not None:
        return grammar
    v = body.get("response_format")
    if v is None:
        return None
    if not isinstance(v, dict) or not isinstance(v.get("type"), str):
        raise bad("response_format", "'response_format' must be an object with a 'type'", "invalid_type")
    kind = v["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise bad("response_format", f"'response_format.type' must be text, json_object or json_schema, got {kind!r}")
    spec = v.get("json_schema")
    if not isinstance(spec, dict):
        raise bad("response_format", "'response_format.json_schema' must be an object with a 'schema'",
                  "missing" if spec is None else "invalid_type")
    schema = spec.get("schema", {})
    if not isinstance(schema, (dict, bool)):
        raise bad("response_format", "'response_format.json_schema.schema' must be a JSON schema object", "invalid_type")
    if spec.get("name") is not None and not isinstance(spec["name"], str):
        raise bad("response_format", "'response_format.json_schema.name' must be a string", "invalid_type")
    return {"type": "json_schema", "json_schema": {"name": spec.get("name"), "schema": schema,
                                                   "strict": bool(spec.get("strict"))}}


def _tools(body: dict, parsed: Parsed) -> None:
    """`tools`, `tool_choice` and `parallel_tool_calls` of a chat request."""
    from ..errors import InputError
    from ..tools import check_tools

    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is not None and tools != []:
        try:
            parsed.tools = check_tools(tools)
        except InputError as e:
            raise bad("tools", str(e)) from None
    if choice is None:
        choice = "auto" if parsed.tools else "none"
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise bad("tool_choice", "a named 'tool_choice' is {\"type\": \"function\", \"function\": {\"name\": ...}}")
        if not parsed.tools or name not in {t["function"]["name"] for t in parsed.tools}:
            raise bad("tool_choice", f"'tool_choice' names {name!r}, which is not in 'tools'")
        choice = {"name": name}
    elif choice not in ("auto", "none", "required"):
        raise bad("tool_choice", "'tool_choice' must be auto, none, required or a named function")
    elif choice != "none" and not parsed.tools:
        raise bad("tool_choice", f"'tool_choice' {choice!r} needs 'tools'")
    parsed.tool_choice = choice
    ptc = body.get("parallel_tool_calls")
    if ptc is not None and not isinstance(ptc, bool):
        raise bad("parallel_tool_calls", "'parallel_tool_calls' must be a boolean", "invalid_type")
    parsed.parallel_tool_calls = True if ptc is None else ptc
    if parsed.response_format is not None and parsed.tools and choice != "none":
        name = format_field(parsed)
        raise bad(name, f"'{name}' cannot be combined with 'tools' unless 'tool_choice' is none",
                  "unsupported_parameter")


def format_field(parsed: Parsed) -> str:
    """The request field that asked for the response format (llama.cpp's json_schema/grammar or OpenAI's)."""
    return (parsed.response_format or {}).get("field", "response_format")


# ---------------------------------------------------------------------------------------------


def _message(m: Any, i: int) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad(where, f"'{where}' must be an object", "invalid_type")
    role = m.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise bad(f"{where}.role", f"'{where}.role' must be one of {', '.join(sorted(ROLES))}, got {role!r}")
    content = m.get("content")
    extra: dict[str, Any] = {}
    if role == "assistant" and m.get("tool_calls") is not None:
        extra["tool_calls"] = _tool_calls(m["tool_calls"], where)
    if role == "tool":
        if not isinstance(m.get("tool_call_id"), str):
            raise bad(f"{where}.tool_call_id", f"'{where}.tool_call_id' is required for role tool", "missing")
        extra["tool_call_id"] = m["tool_call_id"]
    if isinstance(m.get("name"), str):
        extra["name"] = m["name"]
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}.content[{j}]", "only text content parts ({\"type\": \"text\", \"text\": ...}) "
                          "are supported", "unsupported_parameter")
            texts.append(part["text"])
        content = "".join(texts)
    elif content is None:
        if role != "assistant":
            raise bad(f"{where}.content", f"'{where}.content' is required")
        content = ""
    elif not isinstance(content, str):
        raise bad(f"{where}.content", f"'{where}.content' must be a string or a list of text parts", "invalid_type")
    return {"role": "system" if role == "developer" else role, "content": content, **extra}


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls`, as the API sends them back (arguments as JSON text)."""
    if not isinstance(calls, list):
        raise bad(f"{where}.tool_calls", f"'{where}.tool_calls' must be a list", "invalid_type")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad(f"{where}.tool_calls[{j}]", "each tool call needs 'function' with a 'name'")
        args = fn.get("arguments", "{}")
        if not isinstance(args, (str, dict)):
            raise bad(f"{where}.tool_calls[{j}]", "'function.arguments' must be a JSON string", "invalid_type")
        out.append({"id": c.get("id") if isinstance(c.get("id"), str) else f"call_{j}", "type": "function",
                    "function": {"name": fn["name"], "arguments": args}})
    return out


def parse_chat(body: Any, served: "str | ModelNames") -> Parsed:
    parsed = _common(body, served, "chat")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty list", "invalid_type" if messages else "missing")
    parsed.messages = [_message(m, i) for i, m in enumerate(messages)]
    _tools(body, parsed)
    parsed.max_tokens = _max_tokens(body, "max_completion_tokens", "max_tokens")
    if _bool(body, "logprobs"):
        parsed.logprobs = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS_CHAT) or 0
    elif body.get("top_logprobs") is not None:
        _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS_CHAT)
        raise bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    return parsed


def parse_completion(body: Any, served: "str | ModelNames") -> Parsed:
    parsed = _common(body, served, "completion")
    if body.get("tools"):
        raise bad("tools", "'tools' belongs to /v1/chat/completions", "unsupported_parameter")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(_is_int(t) for t in prompt):
            raise bad("prompt", "'prompt' must be a string, a list of token ids, or a list holding one of these"
                      " (batches of several prompts are not supported)")
    elif not isinstance(prompt, str):
        raise bad("prompt", "'prompt' is required: a string or a list of token ids",
                  "missing" if prompt is None else "invalid_type")
    parsed.prompt = prompt
    parsed.max_tokens = _max_tokens(body, "max_tokens")
    parsed.logprobs = _int(body, "logprobs", 0, MAX_LOGPROBS_COMPLETION)
    return parsed


# The checkers, for the other dialects' parsers (anthropic.py, responses.py, ollama.py).
int_field, number_field, bool_field, stop_field, penalty_fields = _int, _number, _bool, _stop, _penalties


def text_content(content: Any, where: str, types: tuple[str, ...] = ("text",)) -> str:
    """A string, or a list of {"type": one of `types`, "text": ...} parts, as one string."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(where, f"'{where}' must be a string or a list of content parts", "invalid_type")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind not in types:
            raise bad(f"{where}[{j}]", f"content parts of type {str(kind)[:40]!r} are not supported "
                      f"(only {', '.join(types)})", "unsupported_parameter")
        if not isinstance(part.get("text"), str):
            raise bad(f"{where}[{j}].text", f"'{where}[{j}].text' must be a string", "invalid_type")
        texts.append(part["text"])
    return "".join(texts)
