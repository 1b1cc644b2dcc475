"""Tool calling: each model family's call syntax, the grammars that enforce it, and the parser
that turns output text back into calls. Shared by every HTTP dialect.

A `ToolFormat` knows one family:

- ``hermes``: Hermes / Qwen ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``;
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``;
- ``llama3``: Llama 3.x JSON calls ``{"name": ..., "parameters": {...}}`` (after an optional
  ``<|python_tag|>``);
- ``json``: a generic JSON object ``{"name": ..., "arguments": {...}}`` at the start of the
  output, for templates without a tool syntax of their own.

`detect_format(tokenizer)` picks the family from the chat template. `call_grammar` gives the
Lark grammar for "must call" (`tool_choice` required or a named function: the call and its
arguments are constrained by the tools' JSON schemas) and for "may call" (`auto`: free text, and
once a call begins the rest of it is constrained). `parse_calls` reads calls out of finished text
(family syntax first, then the generic JSON fallback); `CallStream` does the same while text
streams, holding back only what may be the start of a call.

Tools are OpenAI function tools: ``{"type": "function", "function": {"name", "description",
"parameters"}}``.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from .constrain.grammars import JSON_DEFAULTS
from .errors import InputError

ANY_OBJECT = {"type": "object"}
PYTHON_TAG = "<|python_tag|>"


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def openai(self, index: int | None = None) -> dict[str, Any]:
        """The OpenAI `tool_calls` entry (arguments as a JSON string)."""
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": json.dumps(self.arguments,
                                                                                     ensure_ascii=False)}}
        return out if index is None else {"index": index, **out}


@dataclass(frozen=True)
class ToolFormat:
    name: str  # "hermes", "mistral", "llama3" or "json"
    begin: str = ""  # the text that opens a call ("" : the call is the whole output)
    end: str = ""  # the text that closes one call
    args_key: str = "arguments"  # llama3 says "parameters"
    array: bool = False  # mistral: the calls are one JSON array
    multi: bool = False  # several tagged calls in one message (hermes); JSON formats make one call a turn


FORMATS = {
    "hermes": ToolFormat("hermes", "<tool_call>\n", "\n</tool_call>", multi=True),
    "mistral": ToolFormat("mistral", "[TOOL_CALLS]", "", array=True),
    "llama3": ToolFormat("llama3", args_key="parameters"),
    "json": ToolFormat("json"),
}


def detect_format(tokenizer) -> ToolFormat:
    """The call syntax the model's chat template teaches; the generic JSON one when it has none."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if "<tool_call>" in template:
        return FORMATS["hermes"]
    if "[TOOL_CALLS]" in template:
        return FORMATS["mistral"]
    if "<|python_tag|>" in template or ("<|start_header_id|>" in template and "tools" in template):
        return FORMATS["llama3"]
    return FORMATS["json"]


def template_knows_tools(tokenizer) -> bool:
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


# ---------------------------------------------------------------------------------------------
# Checking the request's tools


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI `tools` -> the same list, checked; InputError naming the problem."""
    if not isinstance(tools, list) or not tools:
        raise InputError("'tools' must be a non-empty list")
    names = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise InputError(f"'{where}' must be {{\"type\": \"function\", \"function\": {{...}}}}")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InputError(f"'{where}.function.name' must be a non-empty string")
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", fn["name"]):
            raise InputError(f"'{where}.function.name' may hold only letters, digits, '_', '.' and '-' (at most 64)")
        if fn["name"] in names:
            raise InputError(f"'{where}.function.name' {fn['name']!r} is given twice")
        names.add(fn["name"])
        params = fn.get("parameters", ANY_OBJECT)
        if not isinstance(params, dict):
            raise InputError(f"'{where}.function.parameters' must be a JSON schema object")
    return tools


def _params(tool: dict[str, Any]) -> dict[str, Any]:
    params = tool["function"].get("parameters") or ANY_OBJECT
    return closed(params if params != {} else ANY_OBJECT)


def closed(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object that lists its properties and
    says nothing about others: calls hold only the arguments the tool declares (a small model
    otherwise invents more). A schema that allows extra properties keeps them."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) if k in ("items", "anyOf", "oneOf", "allOf", "prefixItems", "$defs", "definitions")
           else v for k, v in schema.items()}
    if isinstance(out.get("$defs"), dict):
        out["$defs"] = {k: closed(v) for k, v in schema["$defs"].items()}
    if isinstance(out.get("definitions"), dict):
        out["definitions"] = {k: closed(v) for k, v in schema["definitions"].items()}
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {k: closed(v) for k, v in schema["properties"].items()}
        out.setdefault("additionalProperties", False)
    return out


def call_schema(tools: list[dict[str, Any]], fmt: ToolFormat) -> dict[str, Any]:
    """The JSON schema of one call to any of `tools` (name first, then the arguments)."""
    options = [{"type": "object",
                "properties": {"name": {"const": t["function"]["name"]}, fmt.args_key: _params(t)},
                "required": ["name", fmt.args_key], "additionalProperties": False} for t in tools]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": JSON_DEFAULTS}


def _literal(text: str, tokenizer) -> str:
    """A Lark piece for fixed text: the special token by id when the tokenizer has it as one."""
    if not text:
        return ""
    specials = getattr(getattr(tokenizer, "_backend", None), "special_tokens", {}) or {}
    stripped = text.strip("\n")
    if stripped in specials:
        lead, trail = text[: text.index(stripped)], text[text.index(stripped) + len(stripped):]
        parts = [json.dumps(lead) if lead else "", f"<[{specials[stripped]}]>", json.dumps(trail) if trail else ""]
        return " ".join(p for p in parts if p)
    return json.dumps(text)


def call_grammar(tools: list[dict[str, Any]], fmt: ToolFormat, tokenizer, *, required: bool,
                 parallel: bool = True) -> str:
    """Lark text for the calls. required: the output is one call (or several when `parallel`);
    otherwise free text in which a call, once its opening text appears, must be finished."""
    schema = call_schema(tools, fmt)
    if fmt.array:
        schema = {"type": "array", "items": schema, "minItems": 1, **({} if parallel else {"maxItems": 1}),
                  "x-guidance": JSON_DEFAULTS}
    trigger = fmt.begin.rstrip("\n")  # "<tool_call>", "[TOOL_CALLS]" or ""
    after = fmt.begin[len(trigger):]
    body = " ".join(p for p in (json.dumps(after) if after else "", f"%json {json.dumps(schema)}",
                                _literal(fmt.end, tokenizer)) if p)
    repeat = parallel and fmt.multi  # several calls, each in its own tags
    sep = '"\\n"'
    if required:
        one = f"{_literal(trigger, tokenizer)} {body}" if trigger else body
        return f"start: {'one (' + sep + ' one)*' if repeat else 'one'}\none: {one}\n"
    if trigger:
        opener = _literal(trigger, tokenizer)
        lazy = "" if opener.startswith("<[") else "[lazy]"  # a special token cannot occur inside TEXT
        return (f"start: tagged{'*' if repeat else '?'} TEXT\ntagged: opener {body}\n"
                f"opener{lazy}: TEXT {opener}\nTEXT: /(.|\\n)*/\n")
    # the call is the whole output: text that does not open with "{", or the calls
    return (f"start: TEXT | {'one (' + sep + ' one)*' if repeat else 'one'}\none: {body}\n"
            f"TEXT: /[^{{](.|\\n)*/\n")


# ---------------------------------------------------------------------------------------------
# Parsing calls out of text


def _as_call(obj: Any, names: set[str]) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters"))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if args is None:
        args = {}
    if not isinstance(args, dict) or (names and obj["name"] not in names):
        return None
    return ToolCall(obj["name"], args)


def _json_values(text: str) -> list[Any] | None:
    """Every JSON value in `text`, separated by whitespace, ';' or ','; None if anything else is there."""
    decoder = json.JSONDecoder()
    values, i = [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;,":
            i += 1
        if i == len(text):
            return values
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        values.append(value)


def _calls_from_json(text: str, names: set[str]) -> list[ToolCall] | None:
    values = _json_values(text)
    if not values:
        return None
    flat = [v for value in values for v in (value if isinstance(value, list) else [value])]
    calls = [_as_call(v, names) for v in flat]
    return calls if calls and all(calls) else None  # type: ignore[return-value]


def parse_calls(text: str, fmt: ToolFormat, tools: list[dict[str, Any]] | None = None
                ) -> tuple[str, list[ToolCall]]:
    """Finished text -> (content left over, calls). Calls to tools not in `tools` stay text."""
    names = {t["function"]["name"] for t in tools or []}
    if fmt.name == "hermes":
        calls, content, pos = [], [], 0
        for m in re.finditer(r"<tool_call>(.*?)(?:</tool_call>|$)", text, re.S):
            found = _calls_from_json(m.group(1), names)
            if not found:
                continue
            content.append(text[pos : m.start()])
            calls.extend(found)
            pos = m.end()
        if calls:
            return "".join(content + [text[pos:]]).strip(), calls
    elif fmt.name == "mistral" and "[TOOL_CALLS]" in text:
        before, _, after = text.partition("[TOOL_CALLS]")
        found = _calls_from_json(after, names)
        if found:
            return before.strip(), found
    stripped = text.strip()
    if stripped.startswith(PYTHON_TAG):
        stripped = stripped[len(PYTHON_TAG):].strip()
    if stripped[:1] in ("{", "["):
        found = _calls_from_json(stripped, names)
        if found:
            return "", found
    return text, []


class CallStream:
    """Streams content while holding back text that may turn out to be a call.

    feed(text) -> the content safe to send now; finish() -> (the rest of the content, the calls)."""

    def __init__(self, fmt: ToolFormat, tools: list[dict[str, Any]] | None):
        self.fmt, self.tools = fmt, tools
        self.marker = fmt.begin.strip("\n") if fmt.begin else ""
        self.held = ""  # text not sent yet
        self.sent_any = False  # content went out: a whole-output JSON call is no longer possible
        self.in_call = False

    def feed(self, text: str) -> str:
        self.held += text
        if self.in_call:
            return ""
        if not self.sent_any:  # a call may be the whole output (JSON formats, the generic fallback)
            head = self.held.lstrip()
            if head[:1] in ("{", "[") or head.startswith(PYTHON_TAG):
                self.in_call = True
                return ""
            if PYTHON_TAG.startswith(head):  # nothing yet, or what may become the tag
                return ""
        if self.marker:
            at = self.held.find(self.marker)
            if at >= 0:
                out, self.held, self.in_call = self.held[:at], self.held[at:], True
            else:
                keep = next((k for k in range(min(len(self.marker) - 1, len(self.held)), 0, -1)
                             if self.held.endswith(self.marker[:k])), 0)
                out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep:]
        else:
            out, self.held = self.held, ""
        self.sent_any = self.sent_any or bool(out)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        content, calls = parse_calls(self.held, self.fmt, self.tools)
        self.held = ""
        return content, calls


# ---------------------------------------------------------------------------------------------
# Messages for the chat template


def render_calls(calls: list[dict[str, Any]], fmt: ToolFormat) -> str:
    """An assistant message's OpenAI `tool_calls` as the text the model would have written."""
    objs = []
    for c in calls:
        fn = c.get("function", c)
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                pass
        objs.append({"name": fn.get("name"), fmt.args_key: args})
    if fmt.array:
        return fmt.begin + json.dumps(objs, ensure_ascii=False)
    return "\n".join(fmt.begin + json.dumps(o, ensure_ascii=False) + fmt.end for o in objs)


def tool_instructions(tools: list[dict[str, Any]], fmt: ToolFormat) -> str:
    """A system-prompt section describing the tools, for templates that have no `tools` variable."""
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    example = render_calls([{"name": "<tool name>", "arguments": {"<argument>": "<value>"}}], fmt)
    return (f"You can call these tools (JSON schemas of their arguments):\n{listing}\n"
            f"To call a tool, reply with only: {example}")


def template_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, tokenizer,
                      fmt: ToolFormat | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Messages (OpenAI shape, with `tool_calls` and `role: "tool"`) -> (messages, extra template
    variables) for the model's chat template. A template that knows `tools` gets them as the
    `tools` variable (as transformers passes them) and the calls as `tool_calls` with argument
    objects; one that does not gets the tools in the system message, earlier calls as text and
    tool results as user messages."""
    fmt = fmt or detect_format(tokenizer)
    native = template_knows_tools(tokenizer)
    template = getattr(tokenizer, "chat_template", None) or ""
    names = {}
    out: list[dict[str, Any]] = []
    for m in messages:
        m = dict(m)
        calls = m.get("tool_calls") or []
        for c in calls:
            names[c.get("id")] = c.get("function", {}).get("name")
        if calls:
            if native and "tool_calls" in template:
                m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _loads(c["function"].get("arguments"))}}
                                   for c in calls]
                m["content"] = m.get("content") or ""
            else:
                m.pop("tool_calls", None)
                m["content"] = ((m.get("content") or "") + "\n" + render_calls(calls, fmt)).strip()
        if m.get("role") == "tool":
            name = m.get("name") or names.get(m.get("tool_call_id"))
            if name and "name" not in m:
                m["name"] = name
            if not (native or "tool" in template or renders_role(tokenizer, "tool")):
                m = {"role": "user", "content": f"Result of {name or 'the tool'}: {m.get('content', '')}"}
        out.append(m)
    extra: dict[str, Any] = {}
    if tools:
        if native:
            extra["tools"] = tools
        else:
            note = tool_instructions(tools, fmt)
            if out and out[0].get("role") == "system":
                out[0] = {**out[0], "content": f"{out[0].get('content', '')}\n\n{note}".strip()}
            else:
                out.insert(0, {"role": "system", "content": note})
    return out, extra


def renders_role(tokenizer, role: str) -> bool:
    """Whether the chat template writes a message of this role (some raise on roles they do not know)."""
    probe = "MLXLLAMA-ROLE-PROBE"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": role, "content": probe}],
                                             add_generation_prompt=False, tokenize=False)
    except Exception:  # the template's raise_exception, or a template that cannot handle the role
        return False
    return probe in text


def _loads(args: Any) -> Any:
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return args
    return args
