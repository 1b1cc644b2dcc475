"""The generation options, described once: name, type, default, valid range, help, CLI flags and
the server's request fields.

The CLI builds its click options from `OPTIONS` (cli/options.py), the Python API checks keyword
arguments against it (`checked`), the server checks the sampling fields of a request with each
option's server range (serve/schemas.py) and publishes the same ranges in /openapi.json
(serve/openapi.py). Nothing here imports the model, MLX or click.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .errors import InputError


@dataclass(frozen=True)
class Range:
    """Bounds of a number; None is unbounded, *_open excludes the bound itself."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v: float) -> bool:
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return not (self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)))

    def text(self) -> str:
        """'>= 0', '> 0', 'in (0, 1]', 'between -2 and 2'."""
        lo, hi = _num(self.lo), _num(self.hi)
        if self.lo is not None and self.hi is not None:
            if not (self.lo_open or self.hi_open):
                return f"between {lo} and {hi}"
            return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {hi}"
        return "any value"


def _num(v: float | None) -> str:
    return "" if v is None else (str(int(v)) if float(v).is_integer() else str(v))


@dataclass(frozen=True)
class Option:
    """One generation option. `fields`: the request fields the server reads it from, first
    OpenAI's, then other servers' spellings (empty: not a request field); `server_range`: the
    range a request may use where it is narrower than the library's (OpenAI's temperature)."""

    name: str  # the Python keyword
    type: type  # int, float or str
    default: Any
    help: str
    range: Range = Range()
    flags: tuple[str, ...] = ()  # CLI spellings, the first one shown in errors; empty: not a CLI option
    nullable: bool = False  # None is a valid value (no limit, no seed, off)
    multiple: bool = False  # a list of `type` values (stop strings)
    fields: tuple[str, ...] = ()
    server_range: Range | None = None
    label: str | None = None  # the name in the library's error messages, when not `name`

    @property
    def request_range(self) -> Range:
        return self.server_range or self.range

    def check(self, value: Any) -> Any:
        """The value, or InputError naming the option and its valid range."""
        label = self.label or self.name
        if value is None:
            if self.nullable or self.multiple:
                return value
            raise InputError(f"{label} must be {_kind(self)}, got None")
        if self.multiple:
            items = [value] if isinstance(value, self.type) else value
            if not isinstance(items, (list, tuple)) or not all(isinstance(v, self.type) for v in items):
                raise InputError(f"{label} must be a {self.type.__name__} or a list of them, got {value!r}")
            return value
        if self.type in (int, float):
            ok = isinstance(value, numbers.Real if self.type is float else numbers.Integral) and not isinstance(value, bool)
            if not ok:
                raise InputError(f"{label} must be {_kind(self)}, got {value!r}")
            if not math.isfinite(value) or value not in self.range:
                raise InputError(f"{label} must be {self.range.text()}, got {value}")
        elif not isinstance(value, self.type):
            raise InputError(f"{label} must be {_kind(self)}, got {value!r}")
        return value


def _kind(o: Option) -> str:
    return {int: "an integer", float: "a number", str: "a string"}.get(o.type, o.type.__name__)


ANY = Range()
OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option("max_tokens", int, 256, "Most tokens to generate.", Range(0), ("--max-tokens", "-n"),
           fields=("max_tokens", "max_completion_tokens"), server_range=Range(1)),
    Option("temp", float, 0.0, "Sampling temperature (0: greedy).", Range(0), ("--temp", "--temperature"),
           fields=("temperature",), server_range=Range(0, 2), label="temperature"),
    Option("top_p", float, 1.0, "Nucleus sampling: keep the most likely tokens up to this probability mass.",
           Range(0, 1, lo_open=True), ("--top-p",), fields=("top_p",)),
    Option("top_k", int, 0, "Keep only the k most likely tokens (0: off).", Range(0), ("--top-k",),
           fields=("top_k",), server_range=Range(-1)),  # llama.cpp and vLLM: <= 0 (or -1) is off
    Option("min_p", float, 0.0, "Drop tokens less likely than this fraction of the top token (0: off).",
           Range(0, 1, hi_open=True), ("--min-p",), fields=("min_p",)),
    Option("repetition_penalty", float, None, "Penalty > 0 for tokens seen in the last repetition-context-size "
           "tokens (1: off).", Range(0, lo_open=True), ("--repetition-penalty",), nullable=True,
           fields=("repetition_penalty", "repeat_penalty"), server_range=Range(0, 10, lo_open=True)),
    Option("repetition_context_size", int, 20, "Tokens the repetition penalty looks back over.", Range(1),
           ("--repetition-context-size",), fields=("repetition_context_size",)),
    Option("presence_penalty", float, 0.0, "Subtracted from the logit of every token generated so far "
           "(OpenAI's definition).", Range(-2, 2), ("--presence-penalty",), fields=("presence_penalty",)),
    Option("frequency_penalty", float, 0.0, "Subtracted from a token's logit per time it was generated "
           "(OpenAI's definition).", Range(-2, 2), ("--frequency-penalty",), fields=("frequency_penalty",)),
    Option("seed", int, None, "Seed for reproducible sampling.", ANY, ("--seed",), nullable=True, fields=("seed",),
           server_range=Range(-(1 << 63), (1 << 64) - 1)),
    Option("stop", str, None, "Stop string (repeatable); not printed.", flags=("--stop",), multiple=True,
           fields=("stop",)),
    Option("logit_bias", dict, None, "Added to the logits of these token ids ({id: bias}).", nullable=True,
           fields=("logit_bias",), server_range=Range(-100, 100)),
    Option("prompt_lookup", int, 0, "Speculative decoding drafting N tokens from n-grams of the prompt (0: off).",
           Range(0), ("--prompt-lookup",)),
    Option("max_kv_size", int, None, "Keep at most this many positions in the KV cache (rotating).", Range(8),
           ("--max-kv-size",), nullable=True),
)}

# the options every sampler reads (the rest are logits processors, stopping and speculation)
SAMPLER = ("temp", "top_p", "top_k", "min_p", "seed")


def check(name: str, value: Any) -> Any:
    return OPTIONS[name].check(value)


def check_options(kwargs: dict[str, Any], allowed: Iterable[str] = ()) -> None:
    """InputError for a keyword that is neither a generation option nor in `allowed` (with the
    nearest spelling), or for a generation option's value out of its range."""
    known = set(allowed) | set(OPTIONS)
    for key, value in kwargs.items():
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise InputError(f"unknown generation option {key!r}{hint}")
        if key in OPTIONS:
            OPTIONS[key].check(value)


def checked(func: Callable | None = None, *, also: Callable | None = None) -> Callable:
    """Decorates a generation function so that its keyword arguments are checked against
    `OPTIONS` before it runs: an unknown keyword or an out-of-range value is one InputError.
    `also`: a function the decorated one forwards **kwargs to, whose keywords are accepted too."""
    if func is None:
        return lambda f: checked(f, also=also)
    names = keywords(func) | (keywords(also) if also is not None else set())

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        check_options(kwargs, names)
        return func(*args, **kwargs)

    return wrapper


def keywords(func: Callable) -> set[str]:
    func = inspect.unwrap(func)
    return {p.name for p in inspect.signature(func).parameters.values()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
