"""`mlxllama generate`: stream a completion for a prompt (or a batch of prompts)."""

from __future__ import annotations

import sys

import click

from ..errors import InputError
from .options import format_options, load_draft, model_options, response_format, sampling_kwargs, sampling_options


def build_prompt(tokenizer, prompt: str, system_prompt: str | None, use_template: bool):
    """Applies the chat template when the model has one (as mlx-lm does), else the raw text."""
    if not prompt.strip():
        raise InputError("the prompt is empty")
    if use_template and tokenizer.has_chat_template:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
        messages.append({"role": "user", "content": prompt})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return prompt


@click.command("generate")
@model_options
@click.option("--prompt", "-p", "prompts", multiple=True,
              help="The prompt; '-' reads stdin. Repeat it to generate for several prompts as one batch.")
@click.option("--system-prompt", default=None, help="System message for the chat template.")
@click.option("--ignore-chat-template", is_flag=True, help="Use the prompt as raw text.")
@sampling_options
@format_options
@click.option("--verbose", "-v", is_flag=True, help="End with prompt and generation tokens/s and peak memory.")
def generate_command(model, adapter_path, dtype, prompts, system_prompt, ignore_chat_template, verbose, **opts):
    """Generate text from a prompt, streaming tokens as they come."""
    from ..generate import batch_generate, print_stats, stream_generate
    from ..loader import load

    prompts = [sys.stdin.read() if p == "-" else p for p in prompts] or []
    if not prompts:
        raise InputError("no prompt given: pass --prompt TEXT (or --prompt - to read stdin)")
    for p in prompts:
        if not p.strip():
            raise InputError("the prompt is empty")
    kwargs = sampling_kwargs(opts)
    fmt = response_format(opts)  # checked before the model loads
    if fmt is not None and (opts["draft_model"] or kwargs["prompt_lookup"]):
        from ..errors import GrammarError

        raise GrammarError("--json-schema/--regex/--grammar/--choice cannot be combined with "
                           "--draft-model or --prompt-lookup")
    from ..sample import check_sampling

    check_sampling(kwargs["temp"], kwargs["top_p"], kwargs["top_k"], kwargs["min_p"], kwargs["repetition_penalty"])
    llm, tokenizer = load(model, adapter_path=adapter_path, dtype=dtype)
    encoded = [build_prompt(tokenizer, p, system_prompt, not ignore_chat_template) for p in prompts]

    if len(encoded) > 1:
        outs = batch_generate(llm, tokenizer, encoded, max_tokens=kwargs["max_tokens"], temp=kwargs["temp"],
                              top_p=kwargs["top_p"], top_k=kwargs["top_k"], min_p=kwargs["min_p"],
                              seed=kwargs["seed"], stop=kwargs["stop"], response_format=fmt)
        for i, text in enumerate(outs):
            click.echo(f"--- [{i}] ---")
            click.echo(text)
        return

    draft = load_draft(opts["draft_model"])
    last = None
    for last in stream_generate(llm, tokenizer, encoded[0], draft_model=draft, response_format=fmt, **kwargs):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if verbose and last is not None:
        print_stats(last, file=sys.stderr)
