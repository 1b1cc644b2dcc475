"""SIGKILL while the prompt cache writes an entry to disk: afterwards no partial entry is listed or
loaded, and the next run reuses only complete entries (or recomputes) and answers as a cold run does.

The writer runs in its own process with the file write slowed down (the same bytes, written in small
flushed chunks), so the kill lands inside a write at a random moment."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time

from tinymodels import write_model

PROMPTS = ["the cache keeps this prompt " * 6, "and another conversation that is long " * 5,
           "a third one, with some words in it " * 6]

WRITER = r"""
import shutil, sys, tempfile, time
import mlxllama
from mlxllama.engine import files
from mlxllama.engine.disk import disk_prefix_cache
from mlxllama.generate import batch_generate

model_dir, folder, slow = sys.argv[1], sys.argv[2], sys.argv[3] == "slow"
prompts = sys.argv[4:]
real = files.mx.save_safetensors
side = tempfile.mkdtemp()

def slow_save(path, arrays, metadata=None):
    whole = side + "/whole.safetensors"
    real(whole, arrays, metadata)
    print("writing", flush=True)
    with open(whole, "rb") as src, open(path, "wb") as dst:
        while chunk := src.read(512):
            dst.write(chunk)
            dst.flush()
            time.sleep(0.004)

if slow:
    files.mx.save_safetensors = slow_save
model, tokenizer = mlxllama.load(model_dir)
cache = disk_prefix_cache(model, tokenizer, folder=folder)
for p in prompts:
    text = batch_generate(model, tokenizer, [p], max_tokens=4, prefix_cache=cache)[0]
    print("text", repr(text), flush=True)
shutil.rmtree(side)
"""


def run_writer(model, folder, prompts, slow=True, kill_after=None):
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(model), str(folder), "slow" if slow else "fast", *prompts],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill_after is None:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        return [eval(line[5:]) for line in out.splitlines() if line.startswith("text ")]
    while (line := p.stdout.readline()) and line.strip() != "writing":
        pass
    assert line or p.wait(60) == 0, p.stderr.read()[-3000:]  # nothing left to write: it just ended
    time.sleep(kill_after)
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    return None


def complete_entries(folder, model, tokenizer):
    """Every entry the cache lists loads whole and fits the model; returns their token lists."""
    import json

    from mlxllama.engine.disk import folder_entries
    from mlxllama.engine.files import check_fits, load_prompt_cache

    listed = folder_entries(folder)
    for path, _, _, meta in listed:
        states, _, file_meta = load_prompt_cache(path)  # raises CacheFileError on a partial file
        check_fits(path, states, model, tokenizer, file_meta)
    visible = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert visible == sorted(p.name for p, *_ in listed)
    return [json.loads(meta["mlxllama_tokens"]) for *_, meta in listed]


def test_killed_prompt_cache_writes_leave_only_complete_entries(tmp_path, caplog):
    import mlxllama
    from mlxllama.engine.disk import DiskCache

    model_dir = write_model(tmp_path / "m", "untied", seed=4)
    model, tokenizer = mlxllama.load(model_dir)
    folder = tmp_path / "prompt-cache"
    cold = run_writer(model_dir, tmp_path / "unused-cache", PROMPTS, slow=False)
    rng = random.Random(17)
    mid_write = 0
    for trial in range(5):
        order = rng.sample([*PROMPTS, f"a prompt of this run only, number {trial} " * 5], len(PROMPTS) + 1)
        run_writer(model_dir, folder, order, kill_after=rng.uniform(0.0, 3.0))
        mid_write += any(p.name.startswith(".tmp-") for p in folder.iterdir())
        with caplog.at_level(logging.WARNING, logger="mlxllama.cache"):
            entries = complete_entries(folder, model, tokenizer)
            disk = DiskCache(model, tokenizer, folder)
            for prompt in PROMPTS:  # what a next run finds: a complete entry or nothing, never a broken one
                tokens = tokenizer.encode(prompt)
                hit = disk.lookup(tokens, ["float"], len(tokens))
                assert hit is None or any(e[:hit.length] == tokens[:hit.length] for e in entries)
        assert not caplog.records, [r.getMessage() for r in caplog.records]
    # `mlxllama cache list` shows the complete entries only (the last kill's partial file is not one)
    listing = subprocess.run([sys.executable, "-m", "mlxllama", "cache", "list"], capture_output=True, text=True,
                             check=False, timeout=120, env={**os.environ, "MLXLLAMA_PROMPT_CACHE": str(folder)})
    assert listing.returncode == 0 and f"{len(entries)} entries" in listing.stdout, listing
    assert ".tmp-" not in listing.stdout
    assert mid_write >= 1  # at least one kill landed inside a write
    # the next run (not killed) reuses what is complete, answers as the cold run did, and leaves no debris
    warm = run_writer(model_dir, folder, PROMPTS)
    assert warm == cold
    entries = complete_entries(folder, model, tokenizer)
    assert len(entries) >= len(PROMPTS)
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]
