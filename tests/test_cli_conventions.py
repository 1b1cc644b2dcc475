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
