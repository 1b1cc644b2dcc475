"""`mlxllama qa` with the model split over ring processes on 127.0.0.1: the answers of one process."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from test_distributed import LAUNCH
from tinymodels import write_model

pytestmark = pytest.mark.skipif(LAUNCH is None, reason="mlx.launch is not installed")

# the fields that must agree; the score is compared within rounding, timings and prompt tokens
# (the prefix cache is off with several ranks) are not
SAME = ("question", "answer", "no_answer", "evidence", "extractive", "generation_tokens", "citations")


def qa(*args, ranks: int = 1, parallel: str = "tensor") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mlxllama", "qa", *args]
    if ranks > 1:
        cmd = [LAUNCH, "-n", str(ranks), "--backend", "ring", "--", *cmd, "--parallel", parallel]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    for _ in range(2 if ranks > 1 else 0):  # see test_distributed.launched
        if r.stdout or "connection to a peer was lost" not in r.stderr:
            break
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    return r


def answers(r: subprocess.CompletedProcess) -> list[dict]:
    assert not [line for line in r.stderr.splitlines() if line.startswith("error:")], r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def assert_same(one: list[dict], many: list[dict]) -> None:
    assert len(one) == len(many) > 0
    for a, b in zip(one, many):
        assert {k: a[k] for k in SAME} == {k: b[k] for k in SAME}
        assert [c["start"] for c in a["chunks"]] == [c["start"] for c in b["chunks"]]  # retrieval and reranking
        assert a["score"] == pytest.approx(b["score"], rel=1e-4, abs=1e-6)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("dqa")
    model = write_model(root / "tiny", "gqa_tied", seed=1, max_position_embeddings=4096)
    rng = random.Random(0)
    words = "the river city bridge tower north south old king queen built stone market harbor ship trade".split()
    doc = root / "towns.md"
    doc.write_text("\n\n".join(f"## Section {i}\n\n" + " ".join(rng.choice(words) for _ in range(50))
                               + f". The tower {i} was built in {1800 + 7 * i}." for i in range(10)))
    # chunked (the document exceeds --max-context), BM25 then the model's reranking, answers generated
    args = ["--model", str(model), "--context", str(doc), "--max-context", "128", "--top-chunks", "2", "--rerank", "4",
            "--question", "When was tower 3 built?", "--question", "Who built the old bridge?", "--json", "-n", "24"]
    return args


@pytest.mark.parametrize("mode", ["generative", "extractive"])
def test_two_ranks_answer_as_one_process(setting, mode):
    args = [*setting, "--no-answer-threshold", "off"] + (["--extractive"] if mode == "extractive" else [])
    one = answers(qa(*args))
    assert_same(one, answers(qa(*args, ranks=2, parallel="tensor" if mode == "generative" else "pipeline")))


def test_a_missing_context_file_is_one_line_from_rank_0(setting, tmp_path):
    r = qa("--model", setting[1], "--context", str(tmp_path / "none.txt"), "what?", ranks=2)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: context file not found: {tmp_path / 'none.txt'}"], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_default_model_tensor_over_three_and_pipeline_over_two(default_model_dir, tmp_path):
    doc = tmp_path / "notes.txt"
    doc.write_text("The Eiffel Tower is in Paris. It was completed in 1889 and is 330 metres tall.\n\n"
                   "The Colosseum is in Rome. It was completed in 80 AD.")
    args = ["--model", str(default_model_dir), "--context", str(doc), "--json", "-n", "8",
            "--question", "When was the Eiffel Tower completed?", "--question", "Who painted the Mona Lisa?"]
    one = answers(qa(*args))
    assert "1889" in one[0]["answer"] and one[1]["no_answer"]
    assert_same(one, answers(qa(*args, ranks=3, parallel="tensor")))
    assert_same(one, answers(qa(*args, ranks=2, parallel="pipeline")))
