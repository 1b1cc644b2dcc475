"""`mlxllama chat`: a REPL that keeps the conversation."""

from __future__ import annotations

import sys

import click

from .options import load_draft, model_options, sampling_kwargs, sampling_options

HELP = "Commands: /reset clears the conversation, /exit (or Ctrl-D) leaves; Ctrl-C stops an answer."


@click.command("chat")
@model_options
@click.option("--system-prompt", default=None, help="System message that starts the conversation.")
@sampling_options
def chat_command(model, adapter_path, dtype, dense, system_prompt, **opts):
    """Chat with a model in the terminal."""
    from ..chat import ChatSession
    from ..loader import load

    kwargs = sampling_kwargs(opts)
    llm, tokenizer = load(model, adapter_path=adapter_path, dtype=dtype, dense=dense)
    session = ChatSession(llm, tokenizer, system_prompt=system_prompt,
                          draft_model=load_draft(opts["draft_model"]), **kwargs)
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
            session.reset()
            click.echo("[conversation cleared]", err=True)
            continue
        try:
            for piece in session.send(text):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
