"""The CLI through Click's runner and as a real subprocess, including bad inputs."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

from mlxllama.cli import cli
from tinymodels import write_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(write_model(tmp_path_factory.mktemp("tiny"), "gqa_tied"))


def run(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input)


def mlxllama(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "mlxllama", *args], capture_output=True, text=True,
                          timeout=120, **kwargs)


def test_generate_streams_text(tiny):
    r = run("generate", "--model", tiny, "--prompt", "hello", "-n", "5")
    assert r.exit_code == 0, r.output


def test_generate_verbose_prints_speeds(tiny):
    r = mlxllama("generate", "--model", tiny, "--prompt", "hello", "-n", "5", "--verbose")
    assert r.returncode == 0, r.stderr
    assert "Prompt:" in r.stderr and "tokens-per-sec" in r.stderr and "Peak memory" in r.stderr


def test_generate_reads_stdin_and_batches(tiny):
    r = run("generate", "--model", tiny, "--prompt", "-", "-n", "3", input="hello from stdin")
    assert r.exit_code == 0, r.output
    r = run("generate", "--model", tiny, "-p", "one", "-p", "two", "-n", "3")
    assert r.exit_code == 0 and "--- [1] ---" in r.output


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/model", "--prompt", "hi"], "model folder not found: /no/such/model"),
    (["--prompt", "   "], "the prompt is empty"),
    ([], "no prompt given: pass --prompt TEXT (or --prompt - to read stdin)"),
])
def test_generate_bad_input_is_one_line(tiny, args, message):
    if "--model" not in args:
        args = ["--model", tiny, *args]
    r = mlxllama("generate", *args)
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: {message}"


@pytest.mark.parametrize("option", [["--top-p", "1.5"], ["--temp", "-1"], ["--top-k", "-3"], ["--min-p", "2"]])
def test_out_of_range_sampling_values(tiny, option):
    r = mlxllama("generate", "--model", tiny, "--prompt", "hi", *option)
    assert r.returncode == 2 and "Traceback" not in r.stderr and option[0] in r.stderr


def test_prompt_longer_than_context(tiny):
    r = mlxllama("generate", "--model", tiny, "--ignore-chat-template", "--prompt", "the " * 600)
    assert r.returncode == 1 and "longer than the model's context of 512" in r.stderr
    assert "Traceback" not in r.stderr


def test_broken_model_folder(tmp_path):
    write_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    r = mlxllama("generate", "--model", str(tmp_path), "--prompt", "hi")
    assert r.returncode == 1 and "missing required key" in r.stderr and r.stderr.count("\n") == 1


def test_ctrl_c_keeps_printed_text_and_exits_cleanly(tiny):
    # A child of a background job starts with SIGINT ignored (POSIX shells do that without job
    # control) and Python then installs no KeyboardInterrupt handler: give it a terminal's default.
    p = subprocess.Popen([sys.executable, "-m", "mlxllama", "generate", "--model", tiny, "--prompt", "hello",
                          "-n", "1000000", "--ignore-chat-template"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = p.stdout.read(1)  # generation has started
        # keep reading, as a terminal would: the child must not sit blocked on a full pipe
        errs = []
        threading.Thread(target=p.stdout.read, daemon=True).start()
        err_reader = threading.Thread(target=lambda: errs.append(p.stderr.read()), daemon=True)
        err_reader.start()
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)
        err_reader.join(10)
        err = errs[0] if errs else b""
    finally:
        p.kill()
    assert first and p.returncode == 130
    assert b"Traceback" not in err and b"interrupted" in err


def test_chat_repl_keeps_conversation_and_commands(tiny):
    r = mlxllama("chat", "--model", tiny, "-n", "4", input="hello\n/reset\nagain\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "[conversation cleared]" in r.stderr and r.stdout.count(">> ") == 4


def test_chat_session_reuses_cache(tiny):
    import mlxllama
    from mlxllama.chat import ChatSession

    model, tokenizer = mlxllama.load(tiny)
    session = ChatSession(model, tokenizer, max_tokens=4)
    first = "".join(session.send("hello"))
    offset = session.cache[0].offset
    second = "".join(session.send("more"))
    assert offset > 0 and session.cache[0].offset > offset
    fresh = ChatSession(model, tokenizer, max_tokens=4)
    fresh.messages = list(session.messages[:3])
    assert "".join(fresh.send("more")) == second and isinstance(first, str)


def test_chat_prompt_lookup_sees_earlier_turns(tiny, monkeypatch):
    """Each turn feeds only its new tokens; prompt lookup is also given what the cache holds."""
    import mlxllama
    import mlxllama.chat as chat

    seen = []
    real = chat.stream_generate

    def spy(model, tokenizer, prompt, **kwargs):
        seen.append((list(kwargs["lookup_context"]), list(prompt)))
        return real(model, tokenizer, prompt, **kwargs)

    monkeypatch.setattr(chat, "stream_generate", spy)
    model, tokenizer = mlxllama.load(tiny)
    session = chat.ChatSession(model, tokenizer, max_tokens=4, prompt_lookup=2)
    first = "".join(session.send("hello there"))
    plain = chat.ChatSession(model, tokenizer, max_tokens=4)
    plain.messages = list(session.messages)
    second = "".join(session.send("more"))
    assert seen[0][0] == [] and len(seen[1][0]) > 0
    assert seen[1][0] + seen[1][1] == session._render()[: len(seen[1][0]) + len(seen[1][1])]
    assert "".join(plain.send("more")) == second and isinstance(first, str)


def test_help_lists_commands():
    r = run("--help")
    assert r.exit_code == 0 and "generate" in r.output and "chat" in r.output


def test_convert_then_generate_and_list_models(tiny, tmp_path):
    home = tmp_path / "home"
    out = home / "models" / "tiny-4bit"
    env = {**os.environ, "MLXLLAMA_HOME": str(home)}
    r = mlxllama("convert", tiny, "-o", str(out), "--bits", "4", "--group-size", "32", env=env)
    assert r.returncode == 0, r.stderr
    assert "bits per weight" in r.stdout
    r = mlxllama("generate", "--model", str(out), "--prompt", "hello", "-n", "3", env=env)
    assert r.returncode == 0, r.stderr
    r = mlxllama("models", env=env)
    assert r.returncode == 0 and "tiny-4bit" in r.stdout and "4-bit g32" in r.stdout
    r = mlxllama("convert", tiny, "-o", str(out), env=env)  # exists: refused, nothing touched
    assert r.returncode == 1 and "already exists" in r.stderr and r.stderr.count("\n") == 1
    assert (out / "config.json").is_file()
    r = mlxllama("convert", str(tmp_path / "missing"), "-o", str(tmp_path / "o2"), env=env)
    assert r.returncode == 1 and "missing" in r.stderr and not (tmp_path / "o2").exists()
