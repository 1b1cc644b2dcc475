"""Chat templates rendered the way transformers renders them, in a sandbox.

`render_chats(conversations, template, ...)` is the core of `Tokenizer.apply_chat_template`:

- the template compiles in jinja2's ``ImmutableSandboxedEnvironment`` with transformers' settings
  (``trim_blocks``, ``lstrip_blocks``, the ``loopcontrols`` extension, ``{% generation %}``
  blocks) and globals (``raise_exception``, ``strftime_now``, a ``tojson`` filter that keeps
  unicode and HTML as they are, a ``dict`` and a ``namespace`` that refuse underscore names);
- messages are prepared as transformers prepares them: message objects (dataclasses, pydantic
  models such as the OpenAI SDK's) become dicts, keys whose value is None are dropped (an
  OpenAI-style assistant turn with ``content: None`` and ``tool_calls``), everything the
  template sees is rebuilt from plain JSON types, and ``reasoning`` / ``thinking`` are passed
  as ``reasoning_content`` too (and ``reasoning_content`` as ``thinking``, which gpt-oss reads);
- tools may be JSON schemas or Python functions (see `mlxllama.tool_schema`);
- ``continue_final_message`` ends the prompt exactly where the final message's text ends, with
  its trailing whitespace kept when the template keeps it.

A template that reaches for Python internals (``__class__``, ``__subclasses__``, ``__globals__``)
or calls anything outside the sandbox is refused with one `ChatTemplateError` line, as is a
template that asks for an absurd allocation (``'x' * 10**12``) or that raises an error itself.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any

from .errors import ChatTemplateError

# Names a message's reasoning is passed under; the first is the one most templates read.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
# Largest string or list a template may build with `*` or a padding method, in items.
MAX_TEMPLATE_ITEMS = 50_000_000
# (blocks rendered so far, spans found) while a render records its {% generation %} spans
_TRACKING: ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = ContextVar("generation_spans", default=None)
_PADDING_METHODS = frozenset({"ljust", "rjust", "center", "zfill", "expandtabs"})
_SIZED_FILTERS = ("center", "indent", "batch", "wordwrap", "truncate")


# ---------------------------------------------------------------------------------------------
# The sandbox
# ---------------------------------------------------------------------------------------------


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' tojson: no HTML escaping, unicode kept, json.dumps' options."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _too_big(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n > MAX_TEMPLATE_ITEMS


@lru_cache(maxsize=1)
def _environment() -> Any:
    """The one jinja2 environment every chat template compiles in."""
    from jinja2 import nodes
    from jinja2.exceptions import SecurityError, TemplateError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask markers) renders its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Callable[[], str]) -> str:
            text = caller()
            tracking = _TRACKING.get()
            if tracking is not None:  # where the block's text starts: the blocks rendered so far
                blocks, spans = tracking
                start = sum(map(len, blocks))
                spans.append((start, start + len(text)))
            return text

    class TemplateDict:
        """`dict(...)` and `dict.fromkeys(...)` without the type's attributes."""

        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    def check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"Chat templates cannot store underscore-prefixed attributes on a namespace, "
                                f"but got {name!r}. Please rename the attribute.")

    class TemplateNamespace(Namespace):
        """jinja2's namespace, refusing underscore-prefixed attributes."""

        def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (jinja2's signature trick)
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                check_name(name)
            Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            check_name(name)
            Namespace.__setitem__(self, name, value)

    class Sandbox(ImmutableSandboxedEnvironment):
        """transformers' sandbox, plus a refusal of allocations no chat needs."""

        intercepted_binops = frozenset({"*", "**"})

        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
            """Refused at once (transformers' sandbox renders an empty value and goes on)."""
            raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_TEMPLATE_ITEMS:
                        raise SecurityError(f"the template builds a sequence of {len(seq) * n} items")
            if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                    and left.bit_length() * right > 1_000_000:
                raise SecurityError("the template computes a number too large to use")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            if getattr(__obj, "__name__", None) in _PADDING_METHODS and isinstance(getattr(__obj, "__self__", None), str) \
                    and any(_too_big(a) for a in (*args, *kwargs.values())):
                raise SecurityError(f"the template builds a string of more than {MAX_TEMPLATE_ITEMS} characters")
            return super().call(__context, __obj, *args, **kwargs)

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def bounded(name: str, filter_: Callable[..., Any]) -> Callable[..., Any]:
        """A jinja2 filter that refuses a size argument no chat needs."""
        def checked(*args: Any, **kwargs: Any) -> Any:
            if any(_too_big(a) for a in (*args[1:], *kwargs.values())):
                raise SecurityError(f"the template asks the {name} filter for more than {MAX_TEMPLATE_ITEMS} items")
            return filter_(*args, **kwargs)

        for attr in ("jinja_pass_arg",):  # keep jinja2's pass_context / pass_eval_context marks
            if hasattr(filter_, attr):
                setattr(checked, attr, getattr(filter_, attr))
        return checked

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols])
    for name in _SIZED_FILTERS:
        env.filters[name] = bounded(name, env.filters[name])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


@lru_cache(maxsize=128)
def compile_template(source: str) -> Any:
    """A compiled chat template; ChatTemplateError naming the line when it does not parse."""
    import jinja2

    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not parse (line {e.lineno}): {e.message}") from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return text or type(e).__name__


# ---------------------------------------------------------------------------------------------
# Inputs as transformers prepares them
# ---------------------------------------------------------------------------------------------


def _to_dicts(value: Any) -> Any:
    """Message objects (and the objects inside them) as dicts and lists."""
    if isinstance(value, Mapping):
        return {k: _to_dicts(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_dicts(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_dicts(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_dicts(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _to_dicts(value.model_dump())
    return value


def normalize_messages(conversation: Any) -> list[dict[str, Any]]:
    """A conversation as a list of dicts, each without the keys whose value is None."""
    messages = _to_dicts(getattr(conversation, "messages", conversation))
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(f"a conversation must be a list of messages, got {type(messages).__name__}")
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise ChatTemplateError(f"chat messages must be dicts, got {message!r:.80}")
        out.append({k: v for k, v in message.items() if v is not None})
    return out


def plain_data(value: Any) -> Any:
    """What a template may see: JSON types rebuilt from scratch; anything else an inert "<type>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_data(v) for v in value)
    if type(value).__module__ == "numpy" and callable(getattr(value, "item", None)) and getattr(value, "ndim", 1) == 0:
        return plain_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return plain_data(value.model_dump())
    return f"<{type(value).__name__}>"


def alias_reasoning(chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`reasoning_content` filled from `thinking` / `reasoning`, and `thinking` from either."""
    out = []
    for message in chat:
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def tool_schemas(tools: Any) -> list[dict[str, Any]] | None:
    """Tools as JSON schemas: dicts are kept, Python functions and methods converted."""
    if tools is None:
        return None
    from .tool_schema import get_json_schema

    if not isinstance(tools, (list, tuple)):
        raise ChatTemplateError("tools must be a list of JSON schemas or Python functions")
    schemas = []
    for tool in tools:
        if isinstance(tool, dict):
            schemas.append(tool)
        elif inspect.isfunction(tool) or inspect.ismethod(tool):
            schemas.append(get_json_schema(tool))
        else:
            raise ChatTemplateError("tools should either be a JSON schema, or a callable function with type hints "
                                    "and a docstring suitable for auto-conversion to a schema")
    return schemas


def select_template(templates: str | dict[str, str] | None, chat_template: str | None, tools: Any) -> str | None:
    """transformers' choice: a name among the model's templates, or a template string given; else
    the model's own (`tool_use` when tools are given and the model has one, else `default`)."""
    if isinstance(templates, dict):
        if chat_template is not None:
            return templates.get(chat_template, chat_template)
        if tools is not None and "tool_use" in templates:
            return templates["tool_use"]
        if "default" in templates:
            return templates["default"]
        raise ChatTemplateError("this model has several chat templates and none is the default; pass "
                                f"chat_template= one of {sorted(templates)}")
    return chat_template if chat_template is not None else templates


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _tag_final_message(chat: list[dict[str, Any]], field: str, template: str) -> str:
    """Appends the continue tag to the final message's `field` (or its last text part); returns
    the text that was tagged."""
    if not chat:
        raise ChatTemplateError("continue_final_message is set but the conversation is empty")
    final = chat[-1].get(field)
    if final is None:
        raise ChatTemplateError(f'continue_final_message is set but the final message has no "{field}" to continue')
    fields = [field]
    if field in REASONING_FIELDS:
        fields = [f for f in REASONING_FIELDS if chat[-1].get(f) == final]
    if not any(f in template for f in fields):
        raise ChatTemplateError(f'continue_final_message is set to "{field}" but the chat template does not read it')
    if isinstance(final, (list, tuple)):
        for part in reversed(final):
            if "text" in part:
                text = part["text"]
                part["text"] = text + _CONTINUE_TAG
                return text
        raise ChatTemplateError("continue_final_message is set but the final message has no text to continue")
    for f in fields:
        chat[-1][f] = chat[-1][f] + _CONTINUE_TAG
    return final


def _cut_at_tag(rendered: str, final: Any) -> str:
    """The rendered chat up to the tag: exact when the template kept the text as it was, else
    without the trailing whitespace the template trimmed."""
    tag = _CONTINUE_TAG.strip()
    if not isinstance(final, str) or final.strip() not in rendered or tag not in rendered:
        raise ChatTemplateError("continue_final_message is set but the final message does not appear in the chat "
                                "the template rendered (the template changes or drops it)")
    at = rendered.rindex(tag)
    if rendered[at: at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]
    return rendered[:at].rstrip()


def _check_options(add_generation_prompt: bool, continue_final_message: bool | str) -> None:
    if continue_final_message and add_generation_prompt:
        raise ChatTemplateError("continue_final_message and add_generation_prompt are not compatible: "
                                "continue a final message, or prompt for a new assistant message")


def _render_tracking(compiled: Any, spans_out: list, **variables: Any) -> str:
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    token = _TRACKING.set((blocks, spans))
    try:
        for block in compiled.generate(**variables):
            blocks.append(block)
    finally:
        _TRACKING.reset(token)
    spans_out.append(spans)
    return "".join(blocks)


def render_chats(
    conversations: list[Any],
    template: str,
    *,
    tools: Any = None,
    documents: Any = None,
    add_generation_prompt: bool = False,
    continue_final_message: bool | str = False,
    variables: dict[str, Any] | None = None,
    generation_spans: list[list[tuple[int, int]]] | None = None,
) -> list[str]:
    """Each conversation rendered with `template`; `variables` (special tokens, template
    arguments such as enable_thinking) are visible to the template. ChatTemplateError when
    transformers would refuse, or the template refuses or fails. With `generation_spans` (a
    list), the (start, end) characters of each conversation's {% generation %} blocks are
    appended to it."""
    compiled = compile_template(template)
    _check_options(add_generation_prompt, continue_final_message)
    schemas = tool_schemas(tools)
    if documents is not None and (not isinstance(documents, (list, tuple))
                                  or not all(isinstance(d, dict) for d in documents)):
        raise ChatTemplateError("documents must be a list of dicts with 'title' and 'text' keys")
    shared = {"tools": plain_data(schemas), "documents": plain_data(documents), **plain_data(variables or {})}
    field = continue_final_message if isinstance(continue_final_message, str) else "content"
    rendered = []
    for conversation in conversations:
        chat = alias_reasoning(plain_data(normalize_messages(conversation)))
        final = _tag_final_message(chat, field, template) if continue_final_message else None
        try:
            if generation_spans is None:
                text = compiled.render(messages=chat, add_generation_prompt=add_generation_prompt, **shared)
            else:
                text = _render_tracking(compiled, generation_spans, messages=chat,
                                        add_generation_prompt=add_generation_prompt, **shared)
        except RecursionError:
            raise ChatTemplateError("chat template: recursion too deep") from None
        except Exception as e:  # the template's own code failed or refused: the conversation is the cause
            raise ChatTemplateError(f"chat template: {_one_line(e)}") from None
        rendered.append(_cut_at_tag(text, final) if continue_final_message else text)
    return rendered


# ---------------------------------------------------------------------------------------------
# Models without a template
# ---------------------------------------------------------------------------------------------


def _content_text(content: Any) -> str:
    """Message content as text: a string, or the text parts of a list of {type, text} parts."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def render_plain(conversation: Any, add_generation_prompt: bool, continue_final_message: bool | str) -> str:
    """The format for models without a chat template (as mlx-lm's server falls back to): one
    "role: content" line per message, "assistant:" as the generation prompt."""
    _check_options(add_generation_prompt, continue_final_message)
    messages = normalize_messages(conversation)
    text = "".join(f"{m.get('role', 'user')}: {_content_text(m.get('content'))}\n" for m in messages)
    if continue_final_message:
        if not messages:
            raise ChatTemplateError("continue_final_message is set but the conversation is empty")
        return text[:-1]
    return text + ("assistant:" if add_generation_prompt else "")

