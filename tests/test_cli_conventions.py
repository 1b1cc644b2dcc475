"""mlx-lm's flag names work here, --help shows defaults, chat's commands never reach the model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mlxllama.cli import cli
from tinymodels import write_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(write_model(tmp_path_factory.mktemp("tiny"), "gqa_tied"))


def run(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input)


def generated_tokens(tiny, *args) -> int:
    r = subprocess.run([sys.executable, "-m", "mlxllama", "generate", *args, "-p", "hello", "--ignore-chat-template",
                        "--verbose"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    line = next(line for line in r.stderr.splitlines() if line.startswith("Generation:"))
    return int(line.split()[1])


def test_dash_m_is_max_tokens_as_in_mlx_lm(tiny):
    assert generated_tokens(tiny, "--model", tiny, "-m", "3") == 3
    assert generated_tokens(tiny, "--model", tiny, "--max-tokens", "3") == 3


def test_dash_m_with_a_folder_still_loads_it_with_a_warning(tiny):
    r = subprocess.run([sys.executable, "-m", "mlxllama", "generate", "-m", tiny, "-p", "hi", "-n", "2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "warning: -m now means --max-tokens" in r.stderr


def test_verbose_stats_start_on_their_own_line(tiny):
    r = subprocess.run(f"{sys.executable} -m mlxllama generate --model {tiny} -p hi -n 3 -v 2>&1", shell=True,
                       capture_output=True, text=True, timeout=120)
    lines = r.stdout.splitlines()
    assert "=" * 10 in lines  # the separator alone on its line, not glued to the text


def test_convert_takes_mlx_lm_spellings(tiny, tmp_path):
    out = tmp_path / "out"
    r = run("convert", "--hf-path", tiny, "--mlx-path", str(out), "-q", "--q-bits", "8", "--q-group-size", "32")
    assert r.exit_code == 0, r.output
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["bits"] == 8 and q["group_size"] == 32


@pytest.mark.parametrize("args,message", [
    (["convert"], "no source given"),
    (["convert", "a", "--hf-path", "b", "-o", "x"], "two sources given"),
    (["convert", "a"], "no output folder given"),
])
def test_convert_argument_errors_are_one_line(args, message):
    r = subprocess.run([sys.executable, "-m", "mlxllama", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and message in r.stderr and len(r.stderr.splitlines()) == 1


def test_help_shows_defaults():
    r = run("generate", "--help")
    assert "[default: 256" in r.output
    r = run("serve", "--help")
    assert "[default: 8080" in r.output


def test_fuse_accepts_save_path():
    r = run("fuse", "--help")
    assert "--save-path" in r.output and "--de-quantize" in r.output


def test_chat_help_and_unknown_commands_are_not_sent(tiny, monkeypatch):
    import mlxllama.chat as chat

    sent = []
    real = chat.ChatSession.send

    def spy(self, text):
        sent.append(text)
        return real(self, text)

    monkeypatch.setattr(chat.ChatSession, "send", spy)
    r = run("chat", "--model", tiny, "-n", "2", input="/help\n/bogus\n//literal slash\nhello\n/exit\n")
    assert r.exit_code == 0, r.output
    assert "/reset" in r.output and "unknown command /bogus" in r.output
    assert sent == ["/literal slash", "hello"]


def test_mlx_lm_lora_yaml_keys_work_or_are_refused(tmp_path):
    from mlxllama.errors import ConfigError
    from mlxllama.lora.config import make_config

    good = tmp_path / "good.yaml"
    good.write_text("fine_tune_type: lora\noptimizer: adam\nlr_schedule:\n  name: cosine_decay\n  warmup: 5\n"
                    "  arguments: [2.0e-4, 100, 2.0e-5]\nlora_parameters: {rank: 4, scale: 10.0, dropout: 0.0}\n")
    c = make_config(good)
    assert (c.weight_decay, c.learning_rate, c.warmup, c.rank) == (0.0, 2e-4, 5, 4)
    assert abs(c.min_lr_ratio - 0.1) < 1e-9
    for text, key in [("fine_tune_type: dora\n", "fine_tune_type"), ("optimizer: muon\n", "optimizer"),
                      ("report_to: wandb\n", "report_to"), ("resume_adapter_file: a.safetensors\n", "resume_adapter_file"),
                      ("lr_schedule: {name: linear_schedule}\n", "lr_schedule")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=key):
            make_config(bad)


def all_commands():
    """(name, click command) of every command, subcommands of groups included."""
    import click

    ctx = click.Context(cli)
    out = []

    def walk(group, prefix):
        for name in group.list_commands(ctx):
            command = group.get_command(ctx, name)
            out.append((f"{prefix}{name}", command))
            if isinstance(command, click.Group):
                walk(command, f"{prefix}{name} ")

    walk(cli, "")
    return out


def test_one_short_flag_means_one_thing_in_every_command():
    """A short flag stands for the same long option wherever it appears (mlx-lm's meaning where
    mlx-lm has one): -q is --quantize, -c is --config, -m is --max-tokens."""
    import click

    from mlxllama.cli.flags import DEPRECATED, MEANING

    meanings: dict[str, set[tuple[str, str]]] = {}
    for name, command in all_commands():
        for p in command.params:
            if not isinstance(p, click.Option):
                continue
            longs = [o for o in p.opts + p.secondary_opts if o.startswith("--")]
            meaning = longs[0] if longs else {"m_flag": "--max-tokens"}.get(p.name, p.name)
            for short in (o for o in p.opts + p.secondary_opts if not o.startswith("--")):
                meanings.setdefault(short, set()).add((meaning, name))
    clashes = {s: sorted(uses) for s, uses in meanings.items() if len({m for m, _ in uses}) > 1}
    assert not clashes, f"short flags with several meanings: {clashes}"
    for short, long in MEANING.items():
        assert {m for m, _ in meanings[short]} == {long}
    for name, renamed in DEPRECATED.items():  # the old spellings are no options of their command any more
        command = dict(all_commands())[name]
        opts = {o for p in command.params for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}
        assert not set(renamed) & opts and set(renamed.values()) <= opts, name


def test_old_short_flags_are_rewritten_with_one_warning(capsys):
    from mlxllama.cli.flags import rewrite

    qa = dict(all_commands())["qa"]
    args = ["-c", "notes.txt", "-qWhy?", "--adapter-path", "-q", "-m", "m", "--", "-c"]
    assert rewrite(qa, "qa", args) == ["--context", "notes.txt", "--question=Why?", "--adapter-path", "-q",
                                       "--model", "m", "--", "-c"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "-c, -m, -q in `mlxllama qa` are deprecated" in err and "--question" in err
    assert rewrite(dict(all_commands())["convert"], "convert", ["-q"]) == ["-q"]  # mlx-lm's meaning stays
    assert capsys.readouterr().err == ""
    assert rewrite(qa, "qa", ["-m", "12", "--context", "a"]) == ["--max-tokens", "12", "--context", "a"]
    assert capsys.readouterr().err == ""  # -m N is --max-tokens, as in mlx-lm


def test_old_short_flag_still_works_from_the_command_line(tiny, tmp_path):
    r = subprocess.run([sys.executable, "-m", "mlxllama", "cache-prompt", "-m", tiny, "-p", "a system prompt",
                        "-o", str(tmp_path / "c.safetensors")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines()[0].startswith("warning: -m in `mlxllama cache-prompt` is deprecated")
    assert (tmp_path / "c.safetensors").is_file()
