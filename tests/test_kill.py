"""SIGKILL in the middle of writing: afterwards nothing partial is visible at the destination, and
a killed LoRA run resumes from its last complete checkpoint to the same result as an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from tinymodels import write_model


def complete_model_folder(path: Path) -> bool:
    """A model folder that loads: config.json and every shard the index names, each whole."""
    from mlxllama.convert.safetensors_header import read_header

    if not (path / "config.json").is_file():
        return False
    index = path / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    for shard in shards:
        read_header(path / shard)  # raises on a truncated file
    return True


def kill_after(cmd: list[str], delay: float) -> int:
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    return p.wait()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    # wide enough that converting takes a moment: 8 blocks of 256 -> several small shards
    return write_model(tmp_path_factory.mktemp("kill") / "src", "gqa_tied", hidden_size=256, intermediate_size=1024,
                       num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4)


@pytest.mark.parametrize("delay", [1.5, 3.0])
def test_killed_convert_leaves_no_partial_output(source, tmp_path, delay):
    out = tmp_path / "out"
    kill_after([sys.executable, "-m", "mlxllama", "convert", str(source), "-o", str(out), "--max-shard-size", "200KB"],
               delay)
    assert not out.exists() or complete_model_folder(out)
    # the next run is not blocked by what the killed one left beside the output
    r = subprocess.run([sys.executable, "-m", "mlxllama", "convert", str(source), "-o", str(out), "--force",
                        "--max-shard-size", "200KB"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert complete_model_folder(out)


@pytest.mark.parametrize("delay", [2.0])
def test_killed_fuse_leaves_no_partial_output(tmp_path, delay):
    from test_lora import chat_rows, write_jsonl

    model = write_model(tmp_path / "m", "gqa_tied", quantize={"group_size": 32, "bits": 4}, hidden_size=256,
                        intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4)
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", chat_rows(8))
    write_jsonl(data / "valid.jsonl", chat_rows(2, seed=1))
    r = subprocess.run([sys.executable, "-m", "mlxllama", "lora", "--model", str(model), "--data", str(data),
                        "--adapter-path", str(tmp_path / "a"), "--iters", "1", "--batch-size", "2", "--num-layers", "-1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "fused"
    kill_after([sys.executable, "-m", "mlxllama", "fuse", "--model", str(model), "--adapter-path", str(tmp_path / "a"),
                "-o", str(out)], delay)
    assert not out.exists() or complete_model_folder(out)


def test_killed_lora_resumes_to_the_uninterrupted_result(tmp_path):
    from test_lora import lora_setup

    model, data = lora_setup(tmp_path)
    base = [sys.executable, "-m", "mlxllama", "lora", "--model", str(model), "--data", str(data), "--iters", "40",
            "--batch-size", "2", "--num-layers", "-1", "--save-every", "1", "--steps-per-eval", "1000",
            "--learning-rate", "1e-3"]
    straight = subprocess.run([*base, "--adapter-path", str(tmp_path / "straight")], capture_output=True, text=True,
                              timeout=600)
    assert straight.returncode == 0, straight.stderr
    killed = tmp_path / "killed"
    p = subprocess.Popen([*base, "--adapter-path", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "trainer_state.json"
    end = time.monotonic() + 300
    while time.monotonic() < end:  # kill it once a few checkpoints exist: mid-run, likely mid-write
        try:
            if json.loads(state.read_text())["step"] >= 5:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    step = json.loads(state.read_text())["step"]  # the last complete checkpoint's state still parses
    assert 5 <= step < 40
    resumed = subprocess.run([*base, "--adapter-path", str(killed), "--resume"], capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    a = mx.load(str(tmp_path / "straight" / "adapters.safetensors"))
    b = mx.load(str(killed / "adapters.safetensors"))
    for k in a:
        assert np.allclose(np.array(a[k]), np.array(b[k]), atol=1e-6), k
    losses = [[json.loads(x)["train_loss"] for x in (d / "loss_log.jsonl").read_text().splitlines()
               if "train_loss" in json.loads(x)] for d in (tmp_path / "straight", killed)]
    assert losses[0][-1] == pytest.approx(losses[1][-1], abs=1e-6)
