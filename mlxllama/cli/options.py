"""Options shared by the commands that generate text."""

from __future__ import annotations

import click


def model_options(f):
    f = click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
                     help="Compute dtype (default: float32 on CPU, the checkpoint's half type on GPU).")(f)
    f = click.option("--adapter-path", type=click.Path(), default=None, help="LoRA adapters to apply.")(f)
    f = click.option("--model", "-m", default=None,
                     help="Model folder or Hugging Face repo id (default: SmolLM2-135M-Instruct, fetched on first use).")(f)
    return f


def sampling_options(f):
    f = click.option("--max-kv-size", type=click.IntRange(min=8), default=None,
                     help="Keep at most this many positions in the KV cache (rotating).")(f)
    f = click.option("--prompt-lookup", type=click.IntRange(min=0), default=0,
                     help="Speculative decoding drafting N tokens from n-grams of the prompt (0: off).")(f)
    f = click.option("--draft-model", default=None, help="A small model for speculative decoding.")(f)
    f = click.option("--stop", multiple=True, help="Stop string (repeatable); not printed.")(f)
    f = click.option("--seed", type=int, default=None, help="Seed for reproducible sampling.")(f)
    f = click.option("--repetition-penalty", type=float, default=None, help="Penalty > 0 for repeated tokens (1: off).")(f)
    f = click.option("--min-p", type=click.FloatRange(0, 1, max_open=True), default=0.0, help="Min-p filtering.")(f)
    f = click.option("--top-k", type=click.IntRange(min=0), default=0, help="Top-k filtering (0: off).")(f)
    f = click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, help="Nucleus sampling mass.")(f)
    f = click.option("--temp", "--temperature", "temp", type=click.FloatRange(min=0), default=0.0,
                     help="Sampling temperature (0: greedy).")(f)
    f = click.option("--max-tokens", "-n", type=click.IntRange(min=0), default=256, help="Most tokens to generate.")(f)
    return f


def sampling_kwargs(o: dict) -> dict:
    return dict(
        max_tokens=o["max_tokens"], temp=o["temp"], top_p=o["top_p"], top_k=o["top_k"], min_p=o["min_p"],
        repetition_penalty=o["repetition_penalty"], seed=o["seed"], stop=list(o["stop"]) or None,
        max_kv_size=o["max_kv_size"], prompt_lookup=o["prompt_lookup"],
    )


def load_draft(path):
    if path is None:
        return None
    from ..loader import load_model

    return load_model(path, fuse=True)[0]


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
