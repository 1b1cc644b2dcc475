"""Options shared by the commands that generate text."""

from __future__ import annotations

import sys

import click


def model_options(f):
    """--model, --adapter-path, --dtype, --dense (-m is mlx-lm's --max-tokens, never the model)."""
    f = click.option("--dense", is_flag=True, expose_value=False, callback=_dense_flag,
                     help="CPU: run quantized layers as float32 copies (about 8x the memory of 4-bit weights; "
                          "default: the native quantized kernel when built).")(f)
    f = click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
                     help="Compute dtype (default: float32 on CPU, the checkpoint's half type on GPU).")(f)
    f = click.option("--adapter-path", type=click.Path(), default=None, help="LoRA adapters to apply.")(f)
    f = click.option("--model", default=None,
                     help="Model folder or Hugging Face repo id (default: SmolLM2-135M-Instruct, fetched on first use).")(f)
    return f


def _dense_flag(ctx, param, value):
    if value:
        from ..cpu_weights import prefer_dense

        prefer_dense()


def click_type(o, r=None):
    """The click type of a generation option (mlxllama.generation_options), ranges checked by click."""
    r = r or o.range
    if o.type is int and (r.lo is not None or r.hi is not None):
        return click.IntRange(r.lo, r.hi, min_open=r.lo_open, max_open=r.hi_open)
    if o.type is float and (r.lo is not None or r.hi is not None):
        return click.FloatRange(r.lo, r.hi, min_open=r.lo_open, max_open=r.hi_open)
    return o.type


def request_type(name: str):
    """The click type of a generation option with the range a server request may use (a server default)."""
    from ..generation_options import OPTIONS

    return click_type(OPTIONS[name], OPTIONS[name].request_range)


def generation_option(name: str, *, default=..., help: str | None = None, lo=None):
    """The click option of one generation option, as described in generation_options.OPTIONS;
    `default`, `help`, `lo` (a higher minimum) adapt it to one command."""
    from ..generation_options import OPTIONS, Range

    o = OPTIONS[name]
    r = Range(lo, o.range.hi, o.range.lo_open, o.range.hi_open) if lo is not None else o.range
    return click.option(*o.flags, name, type=click_type(o, r), multiple=o.multiple,
                        default=o.default if default is ... else default, show_default=True,
                        help=help or o.help)


def cli_options() -> list[str]:
    from ..generation_options import OPTIONS

    return [name for name, o in OPTIONS.items() if o.flags]


def sampling_options(f):
    """Every generation option that has CLI flags, plus --draft-model."""
    f = click.option("--draft-model", default=None, help="A small model for speculative decoding.")(f)
    for name in reversed(cli_options()):
        f = generation_option(name)(f)
    return f


def mlx_lm_m_option(f):
    """-m as mlx-lm's generate and chat read it: --max-tokens."""
    return click.option("-m", "m_flag", default=None, metavar="N",
                        help="Same as --max-tokens (mlx-lm's spelling). A value that is not a number is taken as "
                             "--model, with a warning (deprecated).")(f)


def apply_m_flag(model, opts: dict):
    """Resolves -m: a number is --max-tokens (as in mlx-lm); anything else is the model, as -m used to be."""
    value = opts.pop("m_flag", None)
    if value is None:
        return model
    if value.isdigit():
        opts["max_tokens"] = int(value)
        return model
    click.echo("warning: -m now means --max-tokens, as in mlx-lm; use --model for the model "
               "(-m MODEL is accepted for one more release)", err=True)
    return model or value


def sampling_kwargs(o: dict) -> dict:
    """The generation keywords of the parsed options (an empty --stop is None)."""
    kwargs = {name: o[name] for name in cli_options()}
    kwargs["stop"] = list(kwargs["stop"]) or None
    return kwargs


def load_draft(path):
    if path is None:
        return None
    from ..loader import load_model

    return load_model(path, stack=True)[0]


def format_options(f):
    f = click.option("--choice", "choices", multiple=True,
                     help="Constrain the output to one of these strings (repeatable).")(f)
    f = click.option("--grammar", "grammar_file", type=click.Path(dir_okay=False), default=None,
                     help="Constrain the output to a grammar file: .lark (Lark) or .gbnf (llama.cpp GBNF).")(f)
    f = click.option("--regex", default=None, help="Constrain the output to match this regular expression.")(f)
    f = click.option("--json-schema", default=None,
                     help="Constrain the output to JSON valid under this schema: a file or inline JSON.")(f)
    return f


def response_format(o: dict):
    """The constraint the format options ask for (a mlxllama.constrain.Grammar), or None."""
    given = [name for name, v in (("--json-schema", o["json_schema"]), ("--regex", o["regex"]),
                                  ("--grammar", o["grammar_file"]), ("--choice", o["choices"])) if v]
    if not given:
        return None
    from ..errors import InputError

    if len(given) > 1:
        raise InputError(f"give only one of --json-schema, --regex, --grammar, --choice (got {', '.join(given)})")
    from .. import constrain

    if o["json_schema"]:
        text = o["json_schema"]
        if not text.lstrip().startswith(("{", "[", "true", "false")):  # a file name
            import os

            if not os.path.isfile(text):
                raise InputError(f"--json-schema: no such file, and not inline JSON: {text}")
            with open(text, encoding="utf-8") as fh:
                text = fh.read()
        return constrain.json_schema(text)
    if o["regex"]:
        return constrain.regex(o["regex"])
    if o["grammar_file"]:
        return constrain.grammar_file(o["grammar_file"])
    return constrain.choice(list(o["choices"]))


def kv_options(f):
    f = click.option("--quantized-kv-start", type=click.IntRange(min=0), default=0, show_default=True,
                     help="With --kv-bits: quantize the KV cache once it holds this many positions.")(f)
    f = click.option("--kv-group-size", type=int, default=64, show_default=True,
                     help="With --kv-bits: values per quantization group (32, 64 or 128).")(f)
    f = click.option("--kv-bits", type=int, default=None,
                     help="Store the KV cache quantized to 4 or 8 bits (default: full precision).")(f)
    return f


def kv_kwargs(o: dict) -> dict:
    """The KV settings, checked (a bad value is one line naming the allowed ones)."""
    from ..errors import InputError
    from ..models.cache import check_kv_quantization

    try:
        check_kv_quantization(o["kv_bits"], o["kv_group_size"])
    except ValueError as e:
        raise InputError(str(e).replace("kv bits", "--kv-bits").replace("kv group size", "--kv-group-size")) from None
    return dict(kv_bits=o["kv_bits"], kv_group_size=o["kv_group_size"], quantized_kv_start=o["quantized_kv_start"])


def prompt_cache_options(f):
    f = click.option("--no-prompt-cache", is_flag=True, help="Neither read nor write the prompt cache.")(f)
    f = click.option("--prompt-cache-bytes", default="2GB", show_default=True,
                     help="Most bytes the prompt cache keeps (least recently used entries go first).")(f)
    return f


def cache_bytes(o: dict) -> int:
    from ..engine.disk import parse_bytes
    from ..errors import InputError

    try:
        return parse_bytes(o["prompt_cache_bytes"])
    except ValueError as e:
        raise InputError(f"--prompt-cache-bytes: {e}") from None


def session_prefix_cache(llm, tokenizer, o: dict):
    """The disk-backed prefix cache for qa and chat, or None with --no-prompt-cache."""
    if o["no_prompt_cache"]:
        return None
    from ..engine.disk import disk_prefix_cache

    return disk_prefix_cache(llm, tokenizer, cache_bytes(o))


def parallel_option(f):
    f = click.option("--dist-timeout", type=click.FloatRange(min=1), default=120.0,
                     help="Under mlx.launch: seconds a rank waits for the others before it stops with an error.")(f)
    return click.option("--parallel", type=click.Choice(["tensor", "pipeline"]), default="tensor",
                        help="Under mlx.launch with several ranks: split the model by tensor (heads and MLP "
                             "columns) or by pipeline (runs of blocks).")(f)


class Distributed:
    """What a generating command does differently when it runs as one rank of several."""

    def __init__(self, group, timeout: float):
        from .. import distributed

        self.group, self.d = group, distributed
        self.rank = group.rank()
        distributed.quiet_other_ranks(group)
        self.watchdog = distributed.Watchdog(self.rank, timeout)

    @classmethod
    def start(cls, timeout: float) -> "Distributed | None":
        from .. import distributed

        group = distributed.world()
        return cls(group, timeout) if group is not None else None

    def check(self, kwargs: dict, draft_model=None) -> None:
        if kwargs.get("prompt_lookup") or draft_model:
            raise click.UsageError("speculative decoding (--prompt-lookup, --draft-model) is not available with "
                                   "several ranks; leave it off")

    def sampling(self, kwargs: dict) -> dict:
        """The same seed everywhere, and rank 0's token shared each step."""
        from ..sample import make_sampler

        import random

        seed = kwargs.get("seed")
        kwargs["seed"] = self.d.broadcast_int(seed if seed is not None else random.randrange(1 << 30), self.group)
        kwargs["sampler"] = self.d.shared_sampler(
            make_sampler(kwargs["temp"], kwargs["top_p"], kwargs["top_k"], kwargs["min_p"], kwargs["seed"]), self.group)
        return kwargs

    def read_stdin(self) -> str:
        return self.d.broadcast_text(sys.stdin.read() if self.rank == 0 else None, self.group) or ""

    def read_line(self, prompt: str) -> str | None:
        """rank 0 reads a line (None: end of input); every rank gets it. The watchdog sleeps meanwhile."""
        self.watchdog.pause()
        line = None
        if self.rank == 0:
            try:
                line = input(prompt)
            except EOFError:
                line = None
        return self.d.broadcast_text(line, self.group)

    def finish(self) -> None:
        """Waits for this rank's work in flight, then for the others, before the process ends (a rank
        that exits with transfers still queued makes the ring backend complain)."""
        import mlx.core as mx

        self.watchdog.beat()
        mx.synchronize()
        self.d.broadcast_int(0, self.group)
        self.watchdog.pause()
        import time

        time.sleep(0.3)  # let the ring's own threads finish their last transfers before any rank exits

    def watch(self, model):
        return self.d.watched(model, self.watchdog)

    def errors(self):
        """Turns a lost peer (MLX's ring backend raises RuntimeError) into one line."""
        import contextlib

        @contextlib.contextmanager
        def guard():
            try:
                yield
            except RuntimeError as e:
                raise self.d.DistributedError(f"rank {self.rank}: {str(e).splitlines()[0]}") from None

        return guard()
