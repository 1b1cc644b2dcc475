"""`mlxllama generate`: stream a completion for a prompt (or a batch of prompts)."""

from __future__ import annotations

import json
import sys

import click

from ..errors import InputError
from .options import apply_m_flag, load_draft, mlx_lm_m_option, model_options, sampling_kwargs, sampling_options


def build_prompt(tokenizer, prompt: str, system_prompt: str | None, use_template: bool,
                 template_args: dict | None = None):
    """Applies the chat template when the model has one (as mlx-lm does), else the raw text;
    `template_args` are the template's variables (enable_thinking, ...)."""
    if not prompt.strip():
        raise InputError("the prompt is empty")
    if use_template and tokenizer.has_chat_template:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
        messages.append({"role": "user", "content": prompt})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, **(template_args or {}))
    return prompt


def parse_template_config(text: str | None) -> dict:
    """--chat-template-config: a JSON object of template variables."""
    if not text:
        return {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"--chat-template-config is not JSON: {e}") from None
    if not isinstance(config, dict):
        raise InputError("--chat-template-config must be a JSON object, such as '{\"enable_thinking\": false}'")
    return config


@click.command("generate")
@model_options(short_m=False)
@click.option("--prompt", "-p", "prompts", multiple=True,
              help="The prompt; '-' reads stdin. Repeat it to generate for several prompts as one batch.")
@click.option("--system-prompt", default=None, help="System message for the chat template.")
@click.option("--ignore-chat-template", is_flag=True, help="Use the prompt as raw text.")
@click.option("--chat-template-config", default=None,
              help='Chat template variables as a JSON object, e.g. \'{"enable_thinking": false}\'.')
@sampling_options
@mlx_lm_m_option
@click.option("--verbose", "-v", is_flag=True, help="End with prompt and generation tokens/s and peak memory.")
def generate_command(model, adapter_path, dtype, prompts, system_prompt, ignore_chat_template, chat_template_config,
                     verbose, **opts):
    """Generate text from a prompt, streaming tokens as they come."""
    from ..generate import batch_generate, print_stats, stream_generate
    from ..loader import load

    model = apply_m_flag(model, opts)
    prompts = [sys.stdin.read() if p == "-" else p for p in prompts] or []
    if not prompts:
        raise InputError("no prompt given: pass --prompt TEXT (or --prompt - to read stdin)")
    for p in prompts:
        if not p.strip():
            raise InputError("the prompt is empty")
    template_args = parse_template_config(chat_template_config)
    kwargs = sampling_kwargs(opts)
    from ..sample import check_sampling

    check_sampling(kwargs["temp"], kwargs["top_p"], kwargs["top_k"], kwargs["min_p"], kwargs["repetition_penalty"])
    llm, tokenizer = load(model, adapter_path=adapter_path, dtype=dtype)
    encoded = [build_prompt(tokenizer, p, system_prompt, not ignore_chat_template, template_args) for p in prompts]

    if len(encoded) > 1:
        outs = batch_generate(llm, tokenizer, encoded, max_tokens=kwargs["max_tokens"], temp=kwargs["temp"],
                              top_p=kwargs["top_p"], top_k=kwargs["top_k"], min_p=kwargs["min_p"],
                              seed=kwargs["seed"], stop=kwargs["stop"])
        for i, text in enumerate(outs):
            click.echo(f"--- [{i}] ---")
            click.echo(text)
        return

    draft = load_draft(opts["draft_model"])
    last = None
    for last in stream_generate(llm, tokenizer, encoded[0], draft_model=draft, **kwargs):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()  # before the stats on stderr, so they start on a line of their own
    if verbose and last is not None:
        print_stats(last, file=sys.stderr)
