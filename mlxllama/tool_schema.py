"""Python functions as tools: the JSON schema a chat template expects, from type hints and a
Google-style docstring, the same schema transformers.utils.get_json_schema gives.

    def get_weather(city: str, unit: Literal["C", "F"] = "C") -> str:
        \"\"\"The weather in a city.

        Args:
            city: Name of the city.
            unit: Temperature unit.
        \"\"\"

    get_json_schema(get_weather) == {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "Name of the city."},
            "unit": {"type": "string", "enum": ["C", "F"], "description": "Temperature unit."}},
            "required": ["city"]}}}

A hint that has no JSON form (a custom class), a missing hint, or an argument the docstring does
not describe is refused with a ChatTemplateError naming the function and the argument.
"""

from __future__ import annotations

import inspect
import json
import re
import types
from enum import Enum
from typing import Any, Callable, Literal, Union, get_args, get_origin, get_type_hints

from .errors import ChatTemplateError

_DESCRIPTION = re.compile(r"^(.*?)[\n\s]*(Args:|Returns:|Raises:|\Z)", re.DOTALL)
_ARGS = re.compile(r"\n\s*Args:\n(.*?)[\n\s]*(Returns:|Raises:|\Z)", re.DOTALL)
_ONE_ARG = re.compile(
    r"(?:^|\n)([ \t]*)(\w+)(?:[ \t]*\([^()\n]*\))?:\s*(.*?)\s*(?=\n(?!\1[ \t])[ \t]*\w+(?:[ \t]*\([^()\n]*\))?:|\Z)",
    re.DOTALL,
)
_RETURNS = re.compile(r"\n\s*Returns:\n\s*(.*?)[\n\s]*(Raises:|\Z)", re.DOTALL)
_CHOICES = re.compile(r"\(choices:\s*(.*?)\)\s*$", re.IGNORECASE)
_SCALARS = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}
_BARE = {**{t: {"type": name} for t, name in _SCALARS.items()},
         list: {"type": "array"}, tuple: {"type": "array"}, dict: {"type": "object"}, Any: {}}


class _HintError(Exception):
    pass


def _enum(values: list) -> dict[str, Any]:
    if any(type(v) not in _SCALARS for v in values):
        raise _HintError("enum and Literal values must be int, float, str, bool or None")
    kinds = list(dict.fromkeys(_SCALARS[type(v)] for v in values))
    return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": values}


def _bare_type(hint: Any) -> dict[str, Any] | None:
    known = _BARE.get(hint)
    if known is not None:
        return dict(known)
    names = {getattr(hint, "__module__", "") + "." + getattr(hint, "__qualname__", "")}
    if "PIL.Image.Image" in names:
        return {"type": "image"}
    if "torch.Tensor" in names:
        return {"type": "audio"}
    return None


def _schema(hint: Any) -> dict[str, Any]:
    """The JSON schema of one type hint."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is None and isinstance(hint, type) and issubclass(hint, Enum):
        values = [m.value for m in hint]
        if not values:
            raise _HintError(f"the Enum {hint.__name__} has no members")
        return _enum(values)
    if origin is None:
        schema = _bare_type(hint)
        if schema is None:
            raise _HintError(f"the type hint {hint!r} has no JSON schema (use basic types, Enum, Literal, "
                             "and list, tuple, dict and Union of those, or write the schema by hand)")
        return schema
    if origin is Union or origin is types.UnionType:
        subtypes = [_schema(t) for t in args if t is not type(None)]
        if len(subtypes) == 1:
            out = subtypes[0]
        elif all(s.keys() == {"type"} and isinstance(s["type"], str) for s in subtypes):
            names = sorted({s["type"] for s in subtypes})
            out = {"type": names[0] if len(names) == 1 else names}
        else:
            out = {"anyOf": subtypes}
        if type(None) in args:
            out["nullable"] = True
        return out
    if origin is Literal and args:
        return _enum(list(args))
    if origin is list:
        return {"type": "array", "items": _schema(args[0])} if args else {"type": "array"}
    if origin is tuple:
        if not args:
            return {"type": "array"}
        if len(args) == 1 or ... in args:
            raise _HintError(f"the type hint {hint} is a tuple of one or of any length: use list[...] instead")
        return {"type": "array", "prefixItems": [_schema(t) for t in args]}
    if origin is dict:
        out = {"type": "object"}
        if len(args) == 2:
            out["additionalProperties"] = _schema(args[1])
        return out
    raise _HintError(f"the type hint {hint!r} has no JSON schema")


def _parameters(func: Callable) -> dict[str, Any]:
    name = getattr(func, "__name__", "operation")
    hints = get_type_hints(func)
    params = inspect.signature(func).parameters
    first = next(iter(params), None)
    receiver = first if first in {"self", "cls"} and params[first].annotation is inspect.Parameter.empty else None
    required = []
    for pname, param in params.items():
        if pname == receiver:
            continue
        if param.annotation is inspect.Parameter.empty:
            raise ChatTemplateError(f"tool {name}: argument {pname} has no type hint")
        if param.default is inspect.Parameter.empty:
            required.append(pname)
    properties = {}
    for pname, hint in hints.items():
        if pname == receiver:
            continue
        try:
            properties[pname] = _schema(hint)
        except _HintError as e:
            if pname != "return":  # a return type with no JSON form is left out: the model never writes it
                raise ChatTemplateError(f"tool {name}: argument {pname}: {e}") from None
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def parse_docstring(doc: str) -> tuple[str | None, dict[str, str], str | None]:
    """(description, {argument: description}, returns) of a Google-style docstring."""
    description = _DESCRIPTION.search(doc)
    args = _ARGS.search(doc)
    returns = _RETURNS.search(doc)
    arg_docs: dict[str, str] = {}
    if args is not None:
        block = "\n".join(line for line in args.group(1).split("\n") if line.strip())
        arg_docs = {m[1]: re.sub(r"\s*\n+\s*", " ", m[2].strip()) for m in _ONE_ARG.findall(block)}
    return (description.group(1).strip() if description else None, arg_docs,
            returns.group(1).strip() if returns else None)


def get_json_schema(func: Callable) -> dict[str, Any]:
    """{"type": "function", "function": {name, description, parameters[, return]}} for `func`."""
    name = getattr(func, "__name__", "operation")
    doc = inspect.getdoc(func)
    if not doc:
        raise ChatTemplateError(f"tool {name}: the function has no docstring to describe it")
    description, arg_docs, returns_doc = parse_docstring(doc.strip())
    parameters = _parameters(func)
    returns = parameters["properties"].pop("return", None)
    if returns is not None and returns_doc is not None:
        returns["description"] = returns_doc
    for arg, schema in parameters["properties"].items():
        if arg not in arg_docs:
            raise ChatTemplateError(f"tool {name}: the docstring's Args section does not describe argument {arg!r}")
        text = arg_docs[arg]
        choices = _CHOICES.search(text)
        if choices:
            try:
                schema["enum"] = [c.strip() if isinstance(c, str) else c for c in json.loads(choices.group(1))]
            except json.JSONDecodeError:
                raise ChatTemplateError(f"tool {name}: argument {arg}: (choices: ...) is not a JSON list") from None
            text = text[: choices.start()].strip()
        schema["description"] = text
    function: dict[str, Any] = {"name": name, "description": description, "parameters": parameters}
    if returns is not None:
        function["return"] = returns
    return {"type": "function", "function": function}
