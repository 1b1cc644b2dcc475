"""`mlxllama serve` with the model split over two ring processes on 127.0.0.1: rank 0 serves, rank 1 follows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import mlx.core as mx
import openai
import pytest

import mlxllama
from mlxllama.serve import create_app
from test_distributed import LAUNCH, free_ports
from test_serve import LiveServer
from tinymodels import write_model

pytestmark = pytest.mark.skipif(LAUNCH is None, reason="mlx.launch is not installed")

PROMPTS = [f"request number {i} says {'hi ' * i}" for i in range(5)]
MESSAGES = [{"role": "user", "content": "tell me about the sea"}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random model (2 KV heads: splits over 2 ranks) whose greedy text varies (weights scaled up)."""
    path = write_model(tmp_path_factory.mktemp("dserve") / "tiny", "gqa_tied", seed=1, max_position_embeddings=4096)
    weights = mx.load(str(path / "model.safetensors"))
    mx.save_safetensors(str(path / "model.safetensors"),
                        {k: v if "norm" in k else v * 10 for k, v in weights.items()}, metadata={"format": "mlx"})
    return path


def ask_all(client: openai.OpenAI, concurrent: bool) -> list[str]:
    """Completions (streamed and not) of PROMPTS and one chat, sent one by one or all at once."""
    def ask(i):
        if i == len(PROMPTS):
            r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0)
            return r.choices[0].message.content
        if i % 2:
            stream = client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=12 + i, temperature=0,
                                               stream=True)
            return "".join(c.choices[0].text for c in stream)
        return client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=12 + i, temperature=0,
                                         stop=["zz"]).choices[0].text

    if not concurrent:
        return [ask(i) for i in range(len(PROMPTS) + 1)]
    with ThreadPoolExecutor(len(PROMPTS) + 1) as pool:
        return list(pool.map(ask, range(len(PROMPTS) + 1), timeout=240))


@pytest.fixture(scope="module")
def expected(tiny_dir):
    """What a one-process server answers."""
    model, tokenizer = mlxllama.load(tiny_dir)
    with LiveServer(create_app(model, tokenizer, "tiny", max_batch=4)) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=60)
        return ask_all(client, concurrent=False)


class Ranks:
    """Ranks of `mlxllama serve` started by hand (as mlx.launch would), so a test can stop one."""

    def __init__(self, tmp_path, model, *extra, n: int = 2):
        hostfile = tmp_path / "hosts.json"
        ring = free_ports(n + 1)
        hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ring[:n]]))
        self.port = ring[n]
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs = []
        for rank in range(n):
            env = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "mlxllama", "serve", "--model", str(model), "--port", str(self.port),
                 "--max-batch", "4", "--log-level", "warning", *extra],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True))

    def wait_up(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            r0 = self.procs[0]
            assert r0.poll() is None and time.monotonic() < deadline, f"rank 0 did not come up: {self.stderr(0)}"
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def stderr(self, rank: int) -> str:
        p = self.procs[rank]
        if p.poll() is None:
            return "(running)"
        return p.stderr.read()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
            p.wait()


def errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def test_tensor_parallel_server_answers_as_one_process_and_a_killed_follower_ends_it(tmp_path, tiny_dir, expected):
    ranks = Ranks(tmp_path, tiny_dir, "--parallel", "tensor")
    try:
        ranks.wait_up()
        client = ranks.client()
        assert ask_all(client, concurrent=False) == expected
        assert ask_all(client, concurrent=True) == expected  # the batch engine, mirrored, batched
        r = httpx.post(ranks.url + "/v1/qa", json={"question": "q", "context": "c"}, timeout=30)
        assert r.status_code == 501 and "several ranks" in r.json()["error"]["message"]
        ranks.procs[1].kill()
        t = time.monotonic()
        rc = ranks.procs[0].wait(timeout=60)
        assert time.monotonic() - t < 30
        err = ranks.stderr(0)
        assert rc == 1 and len(errors(err)) == 1 and "rank 0" in errors(err)[0], err
        assert "Traceback" not in err
    finally:
        ranks.close()


def test_pipeline_server_answers_as_one_process_and_a_hung_follower_ends_it(tmp_path, tiny_dir, expected):
    ranks = Ranks(tmp_path, tiny_dir, "--parallel", "pipeline", "--dist-timeout", "4")
    try:
        ranks.wait_up()
        assert ask_all(ranks.client(), concurrent=True) == expected
        ranks.procs[1].send_signal(signal.SIGSTOP)  # idle: rank 0's heartbeat notices, no request needed
        t = time.monotonic()
        rc = ranks.procs[0].wait(timeout=60)
        assert time.monotonic() - t < 30
        err = ranks.stderr(0)
        assert rc == 1 and "no answer from the other ranks for 4 s" in err, err
        assert len(errors(err)) == 1 and "Traceback" not in err
    finally:
        ranks.close()


def test_stopping_rank_0_stops_the_follower_cleanly(tmp_path, tiny_dir):
    ranks = Ranks(tmp_path, tiny_dir, "--parallel", "pipeline")
    try:
        ranks.wait_up()
        assert ranks.client().completions.create(model="tiny", prompt="hi", max_tokens=3).usage.completion_tokens
        ranks.procs[0].terminate()
        assert ranks.procs[0].wait(timeout=60) in (0, -15)
        assert ranks.procs[1].wait(timeout=60) == 0, ranks.stderr(1)
        assert not errors(ranks.stderr(1))
    finally:
        ranks.close()


@pytest.mark.slow
def test_default_model_served_over_three_ranks_answers_as_one_process(tmp_path, default_model_dir):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    model, tokenizer = mlxllama.load(default_model_dir)
    with LiveServer(create_app(model, tokenizer, "smol")) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=60)
        want = client.chat.completions.create(model="smol", messages=question, max_tokens=8).choices[0].message.content
    assert "Paris" in want
    ranks = Ranks(tmp_path, default_model_dir, "--parallel", "tensor", n=3)  # 3 KV heads: 3 ranks
    try:
        ranks.wait_up(240)
        name = ranks.client().models.list().data[0].id
        r = ranks.client().chat.completions.create(model=name, messages=question, max_tokens=8)
        assert r.choices[0].message.content == want
    finally:
        ranks.close()
