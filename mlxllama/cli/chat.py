"""`mlxllama chat`: a REPL that keeps the conversation."""

from __future__ import annotations

import sys

import click

from ..generation_options import OPTIONS
from .options import (Distributed, apply_m_flag, kv_kwargs, kv_options, load_draft, mlx_lm_m_option, model_options,
                      parallel_option, prompt_cache_options, sampling_kwargs, sampling_options, session_prefix_cache)

HELP = "Commands: /help shows this, /reset clears the conversation, /exit (or Ctrl-D) leaves; Ctrl-C stops an answer."
COMMANDS_HELP = """/help          this list
/reset         forget the conversation (the system prompt stays)
/exit, /quit   leave (Ctrl-D too)
Ctrl-C         stop the answer being written
Any other line starting with / is refused rather than sent to the model; start a line with // to send
one that begins with /."""


@click.command("chat")
@model_options
@click.option("--system-prompt", default=None, help="System message that starts the conversation.")
@sampling_options
@kv_options
@prompt_cache_options
@click.option("--session", default=None,
              help="Keep the conversation (and its KV cache) under this name; the same name resumes it later.")
@mlx_lm_m_option
@parallel_option
@click.option("--web", is_flag=True, help="Chat in the browser instead: serve the model and open its chat page.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port of the chat page's server (with --web).")
def chat_command(model, adapter_path, dtype, system_prompt, parallel, dist_timeout, web, port, **opts):
    """Chat with a model in the terminal (or in the browser with --web)."""
    model = apply_m_flag(model, opts)
    if web:
        return web_chat(model, adapter_path, dtype, port, system_prompt, opts)
    dist = Distributed.start(dist_timeout)
    if dist is None:
        return repl(model, adapter_path, dtype, system_prompt, opts, None, None)
    with dist.errors():
        repl(model, adapter_path, dtype, system_prompt, opts, dist, parallel)
        dist.finish()


def repl(model, adapter_path, dtype, system_prompt, opts, dist, parallel):
    from ..chat import ChatSession, session_path
    from ..errors import InputError
    from ..loader import load

    kwargs = sampling_kwargs(opts)
    kv = kv_kwargs(opts)
    name = opts["session"]
    path = session_path(name) if name is not None else None
    if dist is not None and path is not None:
        raise InputError("--session is not available with several ranks (each holds part of the KV cache)")
    if dist is not None:
        dist.check(kwargs, opts["draft_model"])
        llm, tokenizer = load(model, adapter_path=adapter_path, dtype=dtype, parallel=parallel)
        llm = dist.watch(llm)
        kwargs = dist.sampling(kwargs)
    else:
        llm, tokenizer = load(model, adapter_path=adapter_path, dtype=dtype)
    prefix_cache = session_prefix_cache(llm, tokenizer, opts) if dist is None else None
    session = ChatSession(llm, tokenizer, system_prompt=system_prompt, draft_model=load_draft(opts["draft_model"]),
                          prefix_cache=prefix_cache, session=path, **kwargs, **kv)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    def say(message: str) -> None:  # rank 0 speaks for all
        if dist is None or dist.rank == 0:
            click.echo(message, err=True)

    say(HELP)
    if path is not None and len(session.messages) > (1 if system_prompt else 0):
        say(f"[resumed session {name!r}: {len(session.messages)} messages]")
    while True:
        try:
            line = input(">> ") if dist is None else dist.read_line(">> ")
            if line is None:
                raise EOFError
        except EOFError:
            click.echo("")
            return
        except KeyboardInterrupt:
            click.echo("")
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            say("[conversation cleared]")
            continue
        if text == "/help":
            say(COMMANDS_HELP)
            continue
        if text.startswith("//"):
            text = text[1:]
        elif text.startswith("/"):
            say(f"unknown command {text.split()[0]}; /help lists the commands")
            continue
        try:
            for piece in session.send(text):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")


# options the page sets per conversation (or the server has no equivalent for)
TERMINAL_ONLY = {"system_prompt": "--system-prompt", "draft_model": "--draft-model",
                 **{name: OPTIONS[name].flags[0] for name in ("top_p", "top_k", "min_p", "repetition_penalty", "seed",
                                                              "stop", "prompt_lookup", "max_kv_size")}}
DEFAULTS = {**{name: OPTIONS[name].default for name in TERMINAL_ONLY if name in OPTIONS}, "stop": ()}


def web_chat(model, adapter_path, dtype, port, system_prompt, opts) -> None:
    """Serves the model on loopback and opens the chat page; --max-tokens and --temp become the
    server's defaults."""
    from ..errors import InputError
    from ..serve import serve

    given = {"system_prompt": system_prompt, **opts}
    unused = [flag for name, flag in TERMINAL_ONLY.items() if given.get(name) not in (None, DEFAULTS.get(name))]
    if unused:
        raise InputError(f"{', '.join(unused)} cannot be used with --web: set the system prompt and sampling "
                         "in the page's conversation settings")
    serve(model, adapter_path=adapter_path, dtype=dtype, port=port, max_tokens=max(1, opts["max_tokens"]),
          temperature=opts["temp"], open_browser=True)
