"""Short flags mean one thing in every command, as in mlx-lm: -q is --quantize, -c is --config,
-m is --max-tokens. The short forms other commands used to give other meanings still parse for one
release, rewritten to their long option with one warning line (`rewrite`)."""

from __future__ import annotations

import click

MEANING = {"-q": "--quantize", "-c": "--config", "-m": "--max-tokens"}
DEPRECATED = {  # command: {old short flag: the long option it stood for there}
    "qa": {"-c": "--context", "-q": "--question", "-m": "--model"},
    "eval-qa": {"-m": "--model"},
    "lora": {"-q": "--quiet", "-m": "--model"},
    "fuse": {"-m": "--model"},
    "bench": {"-q": "--quiet"},
    "serve": {"-m": "--model"},
    "cache-prompt": {"-m": "--model"},
}


def value_options(command: click.Command) -> set[str]:
    """The spellings of the command's options that take a value (the next argument is theirs)."""
    return {o for p in command.params if isinstance(p, click.Option) and not p.is_flag and not p.count
            for o in p.opts + p.secondary_opts}


def rewrite(command: click.Command, name: str, args: list[str]) -> list[str]:
    """`args` with the command's deprecated short flags spelled long; one warning line on stderr
    when there were any. A value of another option and anything after `--` are left alone; `-m N`
    (a number) is --max-tokens where the command has it."""
    renamed = DEPRECATED.get(name)
    if not renamed:
        return args
    takes_value = value_options(command)
    out, used, value_next = [], [], False
    for i, arg in enumerate(args):
        if arg == "--" and not value_next:
            out += args[i:]
            break
        number_next = i + 1 < len(args) and args[i + 1].isdigit()
        if not value_next and arg == "-m" and number_next and "--max-tokens" in takes_value:
            arg = "--max-tokens"  # -m N: mlx-lm's meaning, as in generate and chat
        elif not value_next:
            for short, long in renamed.items():
                if arg == short or (arg.startswith(short) and not arg.startswith("--") and long in takes_value):
                    used.append(short)
                    arg = long if arg == short else f"{long}={arg[len(short):]}"
                    break
        value_next = not value_next and arg in takes_value
        out.append(arg)
    if used:
        shorts = sorted(set(used))
        click.echo(f"warning: {', '.join(shorts)} in `mlxllama {name}` {'are' if len(shorts) > 1 else 'is'} deprecated (short flags mean one thing in "
                   f"every command: {', '.join(f'{s} is {MEANING[s]}' for s in shorts)}); use "
                   f"{', '.join(renamed[s] for s in shorts)}", err=True)
    return out
