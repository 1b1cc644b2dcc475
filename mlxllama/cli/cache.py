"""`mlxllama cache list|clear` (the prompt cache on disk) and `mlxllama cache-prompt` (a prompt's
KV cache in a file, as mlx-lm's cache_prompt writes it)."""

from __future__ import annotations

import sys
import time

import click

from ..errors import InputError
from .options import kv_kwargs, kv_options, model_options


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@click.group("cache")
def cache_command():
    """Show or free the prompt cache on disk (~/.cache/mlxllama/prompt-cache, or $MLXLLAMA_HOME)."""


@cache_command.command("list")
def cache_list():
    """One line per entry: size, tokens, kind, last use, model folder."""
    import json

    from ..engine.disk import default_folder, folder_entries

    folder = default_folder()
    entries = folder_entries(folder)
    total = 0
    for path, size, used, meta in entries:
        total += size
        try:
            n = len(json.loads(meta.get("mlxllama_tokens", "[]")))
        except ValueError:
            n = 0
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(used))
        click.echo(f"{human(size):>9}  {n:>7} tokens  {meta.get('mlxllama_cache_kind', '?'):<7}  {when}  "
                   f"{meta.get('model', '?')}  {path.name}")
    click.echo(f"{len(entries)} entries, {human(total)} in {folder}")
    from ..engine.disk import sessions_folder

    sessions = sorted(sessions_folder().glob("*.safetensors")) if sessions_folder().is_dir() else []
    for path in sessions:
        click.echo(f"{human(path.stat().st_size):>9}  session {path.stem}")
    if sessions:
        click.echo(f"{len(sessions)} chat sessions in {sessions_folder()}")


@cache_command.command("clear")
@click.option("--sessions", is_flag=True, help="Also remove the saved chat sessions.")
def cache_clear(sessions):
    """Removes every entry (and, with --sessions, the saved chat sessions)."""
    from ..engine.disk import default_folder, evict_folder, sessions_folder

    folder = default_folder()
    removed = evict_folder(folder, 0)
    for tmp in folder.glob(".tmp-*") if folder.is_dir() else []:
        tmp.unlink(missing_ok=True)
    click.echo(f"removed {len(removed)} entries from {folder}")
    if sessions and sessions_folder().is_dir():
        gone = list(sessions_folder().glob("*.safetensors"))
        for path in gone:
            path.unlink(missing_ok=True)
        click.echo(f"removed {len(gone)} chat sessions from {sessions_folder()}")


@click.command("cache-prompt")
@model_options
@click.option("--prompt", "-p", default=None, help="The prompt to cache ('-' reads stdin).")
@click.option("--prompt-file", type=click.Path(), default=None, help="Read the prompt from this file.")
@click.option("--output", "-o", "--prompt-cache-file", "output", required=True, type=click.Path(),
              help="The .safetensors file to write (mlx-lm's prompt-cache layout).")
@click.option("--ignore-chat-template", is_flag=True, help="Cache the raw text, not the start of a user message.")
@kv_options
def cache_prompt_command(model, adapter_path, dtype, prompt, prompt_file, output, ignore_chat_template, **opts):
    """Compute a prompt's KV cache once and save it; `generate --prompt-cache-file` (or
    mlx_lm.generate) then continues from it."""
    from ..engine.prompt_file import cache_prompt
    from ..loader import load

    if (prompt is None) == (prompt_file is None):
        raise InputError("give the prompt as --prompt TEXT or --prompt-file FILE (one of them)")
    if prompt_file is not None:
        with open(prompt_file, encoding="utf-8") as f:
            prompt = f.read()
    elif prompt == "-":
        prompt = sys.stdin.read()
    if not output.endswith(".safetensors"):
        raise InputError(f"--output must end in .safetensors: {output}")
    kv = kv_kwargs(opts)
    llm, tokenizer = load(model, adapter_path=adapter_path, dtype=dtype)
    tic = time.perf_counter()
    n = cache_prompt(llm, tokenizer, prompt, output, use_chat_template=not ignore_chat_template,
                     model_name=model, **kv)
    click.echo(f"cached {n} tokens in {time.perf_counter() - tic:.1f} s: {output}", err=True)
