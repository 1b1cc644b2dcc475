"""`mlxllama generate`: stream a completion for a prompt (or a batch of prompts)."""

from __future__ import annotations

import json
import sys

import click

from ..errors import InputError
from .options import (Distributed, apply_m_flag, format_options, kv_kwargs, kv_options, load_draft, mlx_lm_m_option,
                      model_options, parallel_option, response_format, sampling_kwargs, sampling_options)


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
@model_options
@click.option("--prompt", "-p", "prompts", multiple=True,
              help="The prompt; '-' reads stdin. Repeat it to generate for several prompts as one batch.")
@click.option("--system-prompt", default=None, help="System message for the chat template.")
@click.option("--ignore-chat-template", is_flag=True, help="Use the prompt as raw text.")
@click.option("--chat-template-config", default=None,
              help='Chat template variables as a JSON object, e.g. \'{"enable_thinking": false}\'.')
@sampling_options
@format_options
@kv_options
@click.option("--prompt-cache-file", type=click.Path(), default=None,
              help="Continue from a prompt cache made by `mlxllama cache-prompt` (or mlx_lm.cache_prompt).")
@mlx_lm_m_option
@parallel_option
@click.option("--verbose", "-v", is_flag=True, help="End with prompt and generation tokens/s and peak memory.")
def generate_command(model, adapter_path, dtype, prompts, system_prompt, ignore_chat_template, chat_template_config,
                     prompt_cache_file, verbose, parallel, dist_timeout, **opts):
    """Generate text from a prompt, streaming tokens as they come."""
    from ..generate import batch_generate
    from ..loader import load

    model = apply_m_flag(model, opts)
    dist = Distributed.start(dist_timeout)
    prompts = [(dist.read_stdin() if dist else sys.stdin.read()) if p == "-" else p for p in prompts] or []
    if not prompts:
        raise InputError("no prompt given: pass --prompt TEXT (or --prompt - to read stdin)")
    for p in prompts:
        if not p.strip():
            raise InputError("the prompt is empty")
    template_args = parse_template_config(chat_template_config)
    kwargs = sampling_kwargs(opts)
    fmt = response_format(opts)  # checked before the model loads
    if fmt is not None and (opts["draft_model"] or kwargs["prompt_lookup"]):
        from ..errors import GrammarError

        raise GrammarError("--json-schema/--regex/--grammar/--choice cannot be combined with "
                           "--draft-model or --prompt-lookup")
    from ..sample import check_sampling

    check_sampling(kwargs["temp"], kwargs["top_p"], kwargs["top_k"], kwargs["min_p"], kwargs["repetition_penalty"])
    kwargs.update(kv_kwargs(opts))
    if prompt_cache_file is not None:
        import os

        if not os.path.isfile(prompt_cache_file):
            raise InputError(f"--prompt-cache-file not found: {prompt_cache_file}")
        if len(prompts) > 1 or dist is not None:
            raise InputError("--prompt-cache-file continues one prompt in one process: pass --prompt once")
    if dist is not None:
        dist.check(kwargs, opts["draft_model"])
        if len(prompts) > 1:
            raise InputError("one prompt at a time with several ranks")
        with dist.errors():
            llm, tokenizer = load(model, adapter_path=adapter_path, dtype=dtype, parallel=parallel)
            llm = dist.watch(llm)
            kwargs = dist.sampling(kwargs)
            prompt = build_prompt(tokenizer, prompts[0], system_prompt, not ignore_chat_template, template_args)
            _stream(llm, tokenizer, prompt, None, {**kwargs, "response_format": fmt}, verbose and dist.rank == 0)
            dist.finish()
        return
    llm, tokenizer = load(model, adapter_path=adapter_path, dtype=dtype)
    if prompt_cache_file is not None:
        from ..engine.prompt_file import continuation_tokens, load_cache_file

        kwargs["prompt_cache"] = load_cache_file(llm, tokenizer, prompt_cache_file, kwargs["kv_bits"],
                                                 kwargs["kv_group_size"])
        encoded = [continuation_tokens(tokenizer, prompts[0], system_prompt, not ignore_chat_template)]
    else:
        encoded = [build_prompt(tokenizer, p, system_prompt, not ignore_chat_template, template_args)
                   for p in prompts]

    if len(encoded) > 1:
        outs = batch_generate(llm, tokenizer, encoded, **batch_kwargs(tokenizer, encoded, kwargs, opts["draft_model"]),
                              response_format=fmt)
        for i, text in enumerate(outs):
            click.echo(f"--- [{i}] ---")
            click.echo(text)
        return

    _stream(llm, tokenizer, encoded[0], load_draft(opts["draft_model"]), {**kwargs, "response_format": fmt}, verbose)


def batch_kwargs(tokenizer, prompts: list, kwargs: dict, draft_model) -> dict:
    """The generation keywords for a batch of prompts: the shared ones as they are, the penalties as
    one set of logits processors per prompt; speculative decoding and a rotating cache refused."""
    from ..generate import batch_generate, encode_prompt
    from ..generation_options import keywords
    from ..sample import make_logits_processors

    unsupported = [flag for flag, on in (("--draft-model", draft_model), ("--prompt-lookup", kwargs["prompt_lookup"]),
                                         ("--max-kv-size", kwargs["max_kv_size"] is not None)) if on]
    if unsupported:
        raise InputError(f"{', '.join(unsupported)} cannot be used with several prompts: pass --prompt once")
    accepted = keywords(batch_generate)
    out = {k: v for k, v in kwargs.items() if k in accepted}
    processors = [make_logits_processors(None, kwargs["repetition_penalty"], kwargs["repetition_context_size"],
                                         kwargs["presence_penalty"], kwargs["frequency_penalty"],
                                         prompt_tokens=encode_prompt(tokenizer, p).size) for p in prompts]
    if any(processors):
        out["logits_processors"] = processors
    return out


def _stream(llm, tokenizer, prompt, draft, kwargs: dict, verbose: bool) -> None:
    from ..generate import print_stats, stream_generate

    last = None
    for last in stream_generate(llm, tokenizer, prompt, draft_model=draft, **kwargs):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()  # before the stats on stderr, so they start on a line of their own
    if verbose and last is not None:
        print_stats(last, file=sys.stderr)
