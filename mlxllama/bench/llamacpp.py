"""llama.cpp beside mlxllama, for the benchmarks and the parity tests: greedy next tokens at every
position of a token list, greedy continuations, prompt and decode timings, peak memory.

Two Python bindings of llama.cpp can serve, tried in this order:
- xllamacpp: llama.cpp's server in a prebuilt wheel. Its Linux CPU build targets generic x86-64
  (not -march=native), so its speed there is a conservative figure for llama.cpp.
- llama-cpp-python: built from source on install, when its build decodes on this CPU (a build
  can die of an illegal instruction where cpuid reports features it cannot use).

Run it in a process of its own, by path, so that MLX stays out of that process (and out of its
peak memory):

    python mlxllama/bench/llamacpp.py probe BACKEND [GGUF]   # exit 0 when BACKEND loads (and decodes GGUF)
    python mlxllama/bench/llamacpp.py next-tokens GGUF       # stdin: [[ids], ...] -> stdout: [[ids], ...]
    python mlxllama/bench/llamacpp.py generate GGUF N        # stdin: [ids] -> stdout: N greedy ids

`backend()`, `next_tokens()` and `generate()` below do that from another process.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

BACKENDS = ("xllamacpp", "llama-cpp-python")
CAVEATS = {"xllamacpp": "xllamacpp's prebuilt llama.cpp (generic x86-64 build, not -march=native: a conservative "
                        "llama.cpp speed)",
           "llama-cpp-python": "llama-cpp-python (llama.cpp built on install)"}
HERE = Path(__file__).resolve()


def peak_rss_gb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss if sys.platform == "darwin" else rss * 1024) / 1e9


def vocab_size(path: str | os.PathLike) -> int:
    from gguf import GGUFReader

    return len(GGUFReader(path).fields["tokenizer.ggml.tokens"].data)


# --- the engines (in this process) ---------------------------------------------------------------

class XLlamaCpp:
    """llama.cpp's server (one slot) without HTTP: one completion request per call."""

    name = "xllamacpp"

    def __init__(self, path: str | os.PathLike, n_ctx: int = 512, threads: int | None = None):
        import xllamacpp as xlc

        p = xlc.CommonParams()
        p.model.path = str(path)
        p.n_ctx, p.n_parallel, p.n_batch = n_ctx, 1, 512
        p.cpuparams.n_threads = p.cpuparams_batch.n_threads = threads or os.cpu_count() or 1
        p.verbosity = -1  # errors come back in the responses
        self.server = xlc.Server(p)

    def _request(self, tokens: list[int], n: int, cache: bool, **extra) -> dict:
        body = {"prompt": list(tokens), "max_tokens": n, "temperature": 0.0, "top_k": 1, "repeat_penalty": 1.0,
                "ignore_eos": True, "cache_prompt": cache, "n_probs": 1, **extra}
        return self.server.handle_completions(body)

    @staticmethod
    def _ids(response: dict) -> list[int]:
        if "error" in response:
            raise RuntimeError(f"llama.cpp: {response['error']}")
        return [entry["id"] for entry in response["choices"][0]["logprobs"]["content"]]

    def next_tokens(self, tokens: list[int]) -> list[int]:
        """The greedy next token after every prefix (the prompt cache makes each one token of work)."""
        return [self._ids(self._request(tokens[:k], 1, cache=True))[0] for k in range(1, len(tokens) + 1)]

    def generate(self, tokens: list[int], n: int) -> list[int]:
        return self._ids(self._request(tokens, n, cache=False))

    def first_token_s(self, tokens: list[int]) -> float:
        t = time.perf_counter()
        self._request(tokens, 1, cache=False)
        return time.perf_counter() - t

    def token_times(self, tokens: list[int], n: int) -> list[float]:
        """Seconds at which each of n greedy tokens was ready, from llama.cpp's own per-token
        timings (a streamed chunk can carry several tokens: its time is spread evenly over them)."""
        marks = [(0, 0.0)]

        def chunk(c):
            t = (c or {}).get("timings") or {}
            if t.get("predicted_n", 0) > marks[-1][0]:
                marks.append((t["predicted_n"], t["predicted_ms"] / 1e3))

        body = {"prompt": list(tokens), "max_tokens": n, "temperature": 0.0, "top_k": 1, "repeat_penalty": 1.0,
                "ignore_eos": True, "cache_prompt": False, "stream": True, "timings_per_token": True}
        self.server.handle_completions(body, chunk)
        times = []
        for (n0, t0), (n1, t1) in zip(marks, marks[1:]):
            times += [t0 + (t1 - t0) * (i + 1) / (n1 - n0) for i in range(n1 - n0)]
        return times


class LlamaCppPython:
    name = "llama-cpp-python"

    def __init__(self, path: str | os.PathLike, n_ctx: int = 512, threads: int | None = None):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, logits_all=True, verbose=False,
                         n_threads=threads or os.cpu_count() or 1)

    def next_tokens(self, tokens: list[int]) -> list[int]:
        import numpy as np

        self.llm.reset()
        self.llm.eval(tokens)
        return np.asarray(self.llm.scores[: len(tokens)]).argmax(-1).tolist()

    def _stream(self, tokens: list[int], n: int):
        self.llm.reset()
        for i, tok in enumerate(self.llm.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True)):
            yield tok
            if i + 1 >= n:
                return

    def generate(self, tokens: list[int], n: int) -> list[int]:
        return list(self._stream(tokens, n))

    def first_token_s(self, tokens: list[int]) -> float:
        t = time.perf_counter()
        next(self._stream(tokens, 1))
        return time.perf_counter() - t

    def token_times(self, tokens: list[int], n: int) -> list[float]:
        t0, times = time.perf_counter(), []
        for _ in self._stream(tokens, n):
            times.append(time.perf_counter() - t0)
        return times


ENGINES = {"xllamacpp": XLlamaCpp, "llama-cpp-python": LlamaCppPython}


def open_engine(backend_name: str, path: str | os.PathLike, n_ctx: int = 512, threads: int | None = None):
    return ENGINES[backend_name](path, n_ctx=n_ctx, threads=threads)


# --- from another process ----------------------------------------------------------------------

def _run(args: list[str], stdin: str = "", timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HERE), *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@functools.lru_cache(maxsize=None)
def backend(probe_gguf: str | None = None) -> str | None:
    """The first binding that loads here (and decodes `probe_gguf` when given), or None."""
    for name in BACKENDS:
        try:
            if _run(["probe", name] + ([str(probe_gguf)] if probe_gguf else []), timeout=300).returncode == 0:
                return name
        except subprocess.TimeoutExpired:
            continue
    return None


def _call(args: list[str], payload, timeout: float) -> object:
    name = backend()
    if name is None:
        raise RuntimeError("no llama.cpp binding runs here (pip install xllamacpp)")
    r = _run([args[0], "--backend", name, *args[1:]], json.dumps(payload), timeout)
    if r.returncode != 0:
        tail = " | ".join((r.stderr or r.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f"llama.cpp ({name}) exited with {r.returncode}: {tail}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def next_tokens(gguf: str | os.PathLike, token_lists: list[list[int]], timeout: float = 900) -> list[list[int]]:
    """llama.cpp's greedy next token at every position of each token list, on the GGUF file."""
    return _call(["next-tokens", str(gguf)], [list(map(int, t)) for t in token_lists], timeout)


def generate(gguf: str | os.PathLike, tokens: list[int], n: int, timeout: float = 900) -> list[int]:
    """llama.cpp's greedy continuation of `tokens` by n tokens (with xllamacpp, llama.cpp's ignore_eos:
    end-of-generation tokens are never chosen)."""
    return _call(["generate", str(gguf), str(n)], list(map(int, tokens)), timeout)


def main(argv: list[str]) -> None:
    cmd, args = argv[0], argv[1:]
    if cmd == "probe":
        import importlib

        name = args[0]
        importlib.import_module({"xllamacpp": "xllamacpp", "llama-cpp-python": "llama_cpp"}[name])
        if len(args) > 1:
            e = open_engine(name, args[1], n_ctx=64, threads=1)
            e.generate([1, 2, 3], 2)
        return
    name = args[args.index("--backend") + 1]
    args = [a for i, a in enumerate(args) if a != "--backend" and (i == 0 or args[i - 1] != "--backend")]
    payload = json.loads(sys.stdin.read())
    if cmd == "next-tokens":
        longest = max((len(t) for t in payload), default=1)
        # one thread: on a machine with more runnable threads than cores llama.cpp's spinning
        # thread pool is many times slower than a single thread
        e = open_engine(name, args[0], n_ctx=max(256, longest + 8), threads=1)
        out = [e.next_tokens(t) for t in payload]
    elif cmd == "generate":
        n = int(args[1])
        e = open_engine(name, args[0], n_ctx=max(256, len(payload) + n + 8), threads=1)
        out = e.generate(payload, n)
    else:
        raise SystemExit(f"unknown command {cmd!r}")
    sys.stdout.write("\n" + json.dumps(out) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
