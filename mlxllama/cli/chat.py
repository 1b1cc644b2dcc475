"""`mlxllama chat`: a REPL that keeps the conversation."""

from __future__ import annotations

import sys

import click

from .options import (kv_kwargs, kv_options, load_draft, model_options, prompt_cache_options, sampling_kwargs,
                      sampling_options, session_prefix_cache)

HELP = "Commands: /reset clears the conversation, /exit (or Ctrl-D) leaves; Ctrl-C stops an answer."


@click.command("chat")
@model_options
@click.option("--system-prompt", default=None, help="System message that starts the conversation.")
@sampling_options
@kv_options
@prompt_cache_options
@click.option("--session", default=None,
              help="Keep the conversation (and its KV cache) under this name; the same name resumes it later.")
def chat_command(model, adapter_path, dtype, system_prompt, session, **opts):
    """Chat with a model in the terminal."""
    from ..chat import ChatSession, session_path
    from ..loader import load

    kwargs = sampling_kwargs(opts)
    kv = kv_kwargs(opts)
    path = session_path(session) if session is not None else None
    llm, tokenizer = load(model, adapter_path=adapter_path, dtype=dtype)
    chat = ChatSession(llm, tokenizer, system_prompt=system_prompt, draft_model=load_draft(opts["draft_model"]),
                       prefix_cache=session_prefix_cache(llm, tokenizer, opts), session=path, **kwargs, **kv)
    if len(chat.messages) > (1 if system_prompt else 0) and path is not None:
        click.echo(f"[resumed session {session!r}: {len(chat.messages)} messages]", err=True)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    click.echo(HELP, err=True)
    while True:
        try:
            line = input(">> ")
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
            chat.reset()
            click.echo("[conversation cleared]", err=True)
            continue
        try:
            for piece in chat.send(text):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
