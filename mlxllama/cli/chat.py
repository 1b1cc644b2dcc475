"""`mlxllama chat`: a REPL that keeps the conversation."""

from __future__ import annotations

import sys

import click

from .options import apply_m_flag, load_draft, mlx_lm_m_option, model_options, sampling_kwargs, sampling_options

HELP = "Commands: /help shows this, /reset clears the conversation, /exit (or Ctrl-D) leaves; Ctrl-C stops an answer."
COMMANDS_HELP = """/help          this list
/reset         forget the conversation (the system prompt stays)
/exit, /quit   leave (Ctrl-D too)
Ctrl-C         stop the answer being written
Any other line starting with / is refused rather than sent to the model; start a line with // to send
one that begins with /."""


@click.command("chat")
@model_options(short_m=False)
@click.option("--system-prompt", default=None, help="System message that starts the conversation.")
@sampling_options
@mlx_lm_m_option
def chat_command(model, adapter_path, dtype, system_prompt, **opts):
    """Chat with a model in the terminal."""
    from ..chat import ChatSession
    from ..loader import load

    model = apply_m_flag(model, opts)
    kwargs = sampling_kwargs(opts)
    llm, tokenizer = load(model, adapter_path=adapter_path, dtype=dtype)
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
        if text == "/help":
            click.echo(COMMANDS_HELP, err=True)
            continue
        if text.startswith("//"):
            text = text[1:]
        elif text.startswith("/"):
            click.echo(f"unknown command {text.split()[0]}; /help lists the commands", err=True)
            continue
        try:
            for piece in session.send(text):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
