"""The `mlxllama` command: a Click group; each command parses options and calls one library function.

Library errors (mlxllama.errors.MlxllamaError) become one line on stderr and exit code 1; Ctrl-C exits
with 130 after keeping what was printed.
"""

from __future__ import annotations

import sys

import click

from .. import _platform  # noqa: F401  (BLAS before mlx.core)
from ..errors import MlxllamaError

COMMANDS = {
    # name: (module, function)
    "generate": ("generate", "generate_command"),
    "chat": ("chat", "chat_command"),
    "convert": ("convert", "convert_command"),
    "models": ("convert", "models_command"),
    "export-gguf": ("convert", "export_gguf_command"),
    "qa": ("qa", "qa_command"),
    "eval-qa": ("qa", "eval_qa_command"),
    "lora": ("lora", "lora_command"),
    "fuse": ("lora", "fuse_command"),
    "bench": ("bench", "bench_command"),
    "serve": ("serve", "serve_command"),
    "cache": ("cache", "cache_command"),
    "cache-prompt": ("cache", "cache_prompt_command"),
}


class LazyGroup(click.Group):
    """Imports a command's module only when that command runs (keeps start-up fast)."""

    def list_commands(self, ctx):
        return [name for name in COMMANDS if self._module_exists(name)]

    @staticmethod
    def _module_exists(name: str) -> bool:
        import importlib.util

        return importlib.util.find_spec(f"{__name__}.{COMMANDS[name][0]}") is not None

    def get_command(self, ctx, name):
        if name not in COMMANDS or not self._module_exists(name):
            return None
        import importlib

        module, attr = COMMANDS[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)

    def resolve_command(self, ctx, args):
        from .flags import rewrite

        name, command, rest = super().resolve_command(ctx, args)
        return name, command, rewrite(command, name, rest) if command is not None else rest


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="mlxllama")
def cli():
    """Run, convert, question-answer with, fine-tune and serve Llama-family models on MLX."""


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="mlxllama", standalone_mode=False)
    except MlxllamaError as e:
        click.echo("error: " + " ".join(str(e).split()), err=True)  # one line, whatever the message holds
        sys.exit(1)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("\n[interrupted]", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except BrokenPipeError:
        sys.exit(0)
    except OSError as e:  # unreadable files and the like: the user's environment, not a bug
        click.echo(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), err=True)
        sys.exit(1)
    sys.exit(0)
