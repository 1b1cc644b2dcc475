"""The prefix cache on disk and in files: round trips across processes, refusal of caches made for
another model or tokenizer or damaged, mlx-lm's prompt-cache files both ways, chat sessions,
QA's document cache, and bad input through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import pytest

import mlxllama
from mlxllama.chat import ChatSession
from mlxllama.engine.disk import DiskCache, disk_prefix_cache
from mlxllama.engine.files import CacheFileError, check_fits, load_prompt_cache, save_prompt_cache
from mlxllama.engine.prompt_file import cache_prompt, cached_prompt_tokens, load_cache_file
from mlxllama.qa import QASession
from tinymodels import scale_weights, write_model

DOC = "The cat is named Tom and lives in Paris. " * 30 + "The dog is named Rex. " * 20


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = write_model(tmp_path_factory.mktemp("pc") / "tiny", "linear_rope_head_dim", max_position_embeddings=4096)
    return scale_weights(path, 8)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return mlxllama.load(tiny_dir)


def greedy_tokens(model, tokenizer, prompt, n=8, **kwargs):
    return [r.token for r in mlxllama.stream_generate(model, tokenizer, prompt, max_tokens=n, **kwargs)]


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mlxllama", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def one_error_line(r):
    lines = r.stderr.strip().splitlines()
    return r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr


def test_qa_document_cache_hit_equals_cold(tiny, tmp_path):
    model, tokenizer = tiny
    kwargs = dict(no_answer_threshold=None, max_tokens=8)
    cold = QASession(model, tokenizer, DOC, **kwargs).ask("What is the cat named?")
    first = QASession(model, tokenizer, DOC, prefix_cache=disk_prefix_cache(model, tokenizer, folder=tmp_path),
                      **kwargs)
    a = first.ask("What is the cat named?")
    assert a.answer == cold.answer and first.reused_tokens == 0
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    second = QASession(model, tokenizer, DOC, prefix_cache=disk_prefix_cache(model, tokenizer, folder=tmp_path),
                       **kwargs)  # a new session, as a new process would make
    b = second.ask("What is the cat named?")
    assert second.reused_tokens > 0 and b.prompt_tokens < a.prompt_tokens
    assert b.answer == cold.answer and b.score == pytest.approx(cold.score, rel=1e-4)


def test_qa_across_processes(tiny_dir, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(DOC)
    args = ["qa", "--model", tiny_dir, "--context", doc, "What is the dog named?", "-v", "--no-answer-threshold", "off", "-n", "6"]
    first, second = cli(*args), cli(*args)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "from the prompt cache" not in first.stderr and "from the prompt cache" in second.stderr
    assert first.stdout == second.stdout
    off = cli(*args, "--no-prompt-cache")
    assert "from the prompt cache" not in off.stderr and off.stdout == first.stdout
    listing = cli("cache", "list")
    assert listing.returncode == 0 and "1 entries" in listing.stdout and str(tiny_dir) in listing.stdout
    assert "removed 1 entries" in cli("cache", "clear").stdout and "0 entries" in cli("cache", "list").stdout


def test_damaged_disk_entry_is_warned_about_and_ignored(tiny, tmp_path, caplog):
    model, tokenizer = tiny
    kwargs = dict(no_answer_threshold=None, max_tokens=6)
    cold = QASession(model, tokenizer, DOC, **kwargs).ask("Where does the cat live?")
    QASession(model, tokenizer, DOC, prefix_cache=disk_prefix_cache(model, tokenizer, folder=tmp_path),
              **kwargs).ask("Where does the cat live?")
    (entry,) = tmp_path.glob("*.safetensors")
    data = bytearray(entry.read_bytes())
    data[-100:] = bytes(100)  # corrupted tensor bytes: the checksum catches it
    entry.write_bytes(bytes(data))
    session = QASession(model, tokenizer, DOC, prefix_cache=disk_prefix_cache(model, tokenizer, folder=tmp_path),
                        **kwargs)
    assert session.ask("Where does the cat live?").answer == cold.answer and session.reused_tokens == 0
    assert "corrupted" in caplog.text
    entry.write_bytes(entry.read_bytes()[:2000])  # truncated
    with pytest.raises(CacheFileError, match="cannot read"):
        load_prompt_cache(entry)


def test_unwritable_folder_only_warns(tiny, tmp_path, caplog):
    model, tokenizer = tiny
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cache = disk_prefix_cache(model, tokenizer, folder=blocker / "cache")
    answer = QASession(model, tokenizer, DOC, prefix_cache=cache, no_answer_threshold=None, max_tokens=4).ask("Who?")
    assert answer.answer is not None and "cannot write the prompt cache" in caplog.text


def test_cache_of_another_model_or_tokenizer_is_refused(tiny, tiny_dir, tmp_path):
    model, tokenizer = tiny
    path = tmp_path / "sys.safetensors"
    cache_prompt(model, tokenizer, "You answer questions about cats.", path)
    other_dir = write_model(tmp_path / "other", "linear_rope_head_dim", seed=5, max_position_embeddings=4096)
    other = mlxllama.load(other_dir)
    with pytest.raises(CacheFileError, match="another model"):
        load_cache_file(*other, path)
    retok = tmp_path / "retok"
    shutil.copytree(tiny_dir, retok)
    config = json.loads((retok / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (retok / "tokenizer_config.json").write_text(json.dumps(config))
    model2, tokenizer2 = mlxllama.load(retok)
    states, _, meta = load_prompt_cache(path)
    with pytest.raises(CacheFileError, match="another tokenizer"):
        check_fits(path, states, model2, tokenizer2, meta)
    # the disk tier simply does not offer entries of other models
    disk = DiskCache(model, tokenizer, tmp_path / "d")
    disk.save([1, 2, 3, 4, 5], states, "float")
    assert DiskCache(other[0], other[1], tmp_path / "d").probe([1, 2, 3, 4, 5, 6], ["float"], 5) == 0
    assert disk.probe([1, 2, 3, 4, 5, 6], ["float"], 5) == 5


def test_prompt_cache_file_continues_like_the_whole_prompt(tiny, tmp_path):
    model, tokenizer = tiny
    path = tmp_path / "sys.safetensors"
    system = "You answer questions about cats. " * 4
    n = cache_prompt(model, tokenizer, system, path)
    cached = cached_prompt_tokens(tokenizer, system)
    assert n == len(cached)
    rest = tokenizer.encode(" And dogs?", add_special_tokens=False)
    whole = greedy_tokens(model, tokenizer, cached + rest)
    assert greedy_tokens(model, tokenizer, rest, prompt_cache=load_cache_file(model, tokenizer, path)) == whole
    qpath = tmp_path / "q.safetensors"
    cache_prompt(model, tokenizer, system, qpath, kv_bits=8, kv_group_size=32)
    with pytest.raises(mlxllama.MlxllamaError, match="kv-bits 8"):
        load_cache_file(model, tokenizer, qpath, kv_bits=4, kv_group_size=32)
    q = load_cache_file(model, tokenizer, qpath, kv_bits=8, kv_group_size=32)
    assert greedy_tokens(model, tokenizer, rest, prompt_cache=q, kv_bits=8, kv_group_size=32) == \
        greedy_tokens(model, tokenizer, cached + rest, kv_bits=8, kv_group_size=32)


MLX_LM_READS = """
import sys, mlx.core as mx
from mlx_lm.models.cache import load_prompt_cache
from mlx_lm.generate import generate_step
from mlx_lm.utils import load
model, tok = load(sys.argv[1])
cache, meta = load_prompt_cache(sys.argv[2], return_metadata=True)
print(type(cache[0]).__name__, cache[0].offset, meta["model"])
rest = [int(t) for t in sys.argv[3].split(",")]
out = [t for t, _ in generate_step(mx.array(rest), model, prompt_cache=cache, max_tokens=8)]
print(",".join(map(str, out)))
"""

MLX_LM_WRITES = """
import sys, mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache, save_prompt_cache
from mlx_lm.utils import load
model, tok = load(sys.argv[1])
cache = make_prompt_cache(model)
model(mx.array([[int(t) for t in sys.argv[3].split(",")]]), cache=cache)
mx.eval([c.state for c in cache])
save_prompt_cache(sys.argv[2], cache, {"model": sys.argv[1], "tokenizer_config": "{}"})
"""


def run_mlx_lm(script, *args):
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()


def test_mlx_lm_interop_both_ways(tiny, tiny_dir, tmp_path):
    model, tokenizer = tiny
    prefix = tokenizer.encode("the cat sat on the mat and looked at the dog " * 2)
    rest = tokenizer.encode(" then it slept")
    whole = greedy_tokens(model, tokenizer, prefix + rest)
    ours = tmp_path / "ours.safetensors"
    mlxllama_cache = model.make_cache()
    model(mx.array([prefix]), cache=mlxllama_cache)
    save_prompt_cache(ours, [c.state for c in mlxllama_cache], tokens=prefix, model=model, tokenizer=tokenizer,
                      metadata={"model": str(tiny_dir)})
    kind, tokens = run_mlx_lm(MLX_LM_READS, tiny_dir, ours, ",".join(map(str, rest)))
    assert kind.split() == ["KVCache", str(len(prefix)), str(tiny_dir)]
    assert [int(t) for t in tokens.split(",")][:4] == whole[:4]  # mlx-lm's own arithmetic: the first tokens
    theirs = tmp_path / "theirs.safetensors"
    run_mlx_lm(MLX_LM_WRITES, tiny_dir, theirs, ",".join(map(str, prefix)))
    caches = load_cache_file(model, tokenizer, theirs)
    assert caches[0].offset == len(prefix)
    assert greedy_tokens(model, tokenizer, rest, prompt_cache=caches) == whole


def test_chat_session_resumes_and_prefix_cache_is_shared(tiny, tmp_path):
    model, tokenizer = tiny
    path = tmp_path / "sessions" / "s.safetensors"
    straight = ChatSession(model, tokenizer, system_prompt="be brief", max_tokens=6)
    first = "".join(straight.send("hello there"))
    second = "".join(straight.send("and then?"))
    a = ChatSession(model, tokenizer, system_prompt="be brief", session=path, max_tokens=6)
    assert "".join(a.send("hello there")) == first and path.is_file()
    b = ChatSession(model, tokenizer, system_prompt="be brief", session=path, max_tokens=6)  # a later process
    assert b.messages == a.messages and b.cache[0].offset > 0
    assert "".join(b.send("and then?")) == second and b.reused > 0
    shared = disk_prefix_cache(model, tokenizer, folder=tmp_path / "pc")
    "".join(ChatSession(model, tokenizer, system_prompt="be brief", prefix_cache=shared, max_tokens=6).send("hello there"))
    c = ChatSession(model, tokenizer, system_prompt="be brief", prefix_cache=disk_prefix_cache(
        model, tokenizer, folder=tmp_path / "pc"), max_tokens=6)
    assert "".join(c.send("hello there")) == first and c.reused > 0


def test_cli_bad_cache_input(tiny_dir, tmp_path):
    other = write_model(tmp_path / "other", "linear_rope_head_dim", seed=5, max_position_embeddings=4096)
    good = tmp_path / "sys.safetensors"
    r = cli("cache-prompt", "--model", tiny_dir, "-p", "a system prompt", "-o", good)
    assert r.returncode == 0 and good.is_file(), r.stderr
    r = cli("generate", "--model", tiny_dir, "--prompt-cache-file", good, "-p", "go on", "-n", "3")
    assert r.returncode == 0, r.stderr
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(good.read_bytes()[:1500])
    for args in (["--model", other, "--prompt-cache-file", good],
                 ["--model", tiny_dir, "--prompt-cache-file", truncated],
                 ["--model", tiny_dir, "--prompt-cache-file", tmp_path / "missing.safetensors"],
                 ["--model", tiny_dir, "--kv-bits", "3"], ["--model", tiny_dir, "--kv-bits", "4", "--kv-group-size", "16"]):
        r = cli("generate", *args, "-p", "hello", "-n", "2")
        assert one_error_line(r), (args, r.stderr)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = cli("cache-prompt", "--model", tiny_dir, "-p", "x", "-o", blocker / "out.safetensors")
    assert one_error_line(r) and not (blocker / "out.safetensors").exists()
    assert not list(tmp_path.glob(".tmp-*"))
