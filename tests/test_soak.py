"""A short soak of the server (benchmarks/soak_serve.py): 16 clients for 30 s mixing streamed and
plain requests, clients hanging up mid-answer and bad requests. No request lost, no 5xx, the
server alive at the end, memory flat after warm-up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tinymodels import write_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "soak_serve.py"


@pytest.mark.slow
def test_soak(tmp_path):
    model = write_model(tmp_path / "m", "untied", seed=2)
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--model", str(model), "--clients", "16", "--seconds", "30",
                        "--warmup", "8", "--max-growth", "10", "--server-arg=--prompt-cache-bytes",
                        "--server-arg=8MB", "--json", str(out)], capture_output=True, text=True, timeout=600)
    stats = json.loads(out.read_text())
    assert r.returncode == 0, (stats, r.stderr[-2000:])
    assert stats["completed"] > 50 and stats["cancelled"] > 0 and stats["bad_ok"] > 0
    assert stats["lost"] == 0 and stats["5xx"] == 0 and stats["bad_wrong"] == 0 and stats["server_alive"]
