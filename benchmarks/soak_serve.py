"""Soak test of `mlxllama serve`: many concurrent clients for a bounded time, mixing streamed and
plain requests, clients that hang up mid-answer, and bad requests.

    python benchmarks/soak_serve.py [--model DIR] [--clients 16] [--seconds 600] [--json out.json]

It starts the server itself on a free loopback port (traffic never leaves 127.0.0.1), warms it up,
then runs the clients and reports: requests by outcome, p50/p99 latency of good requests, the
server's RSS after warm-up and at the end (growth in percent), and whether the server still
answers. A good request must complete (200) or be turned away with 429/503; anything else is
counted as lost. Exit status 1 if any request was lost, a 5xx other than 503 came back, the
server died, or RSS grew more than --max-growth percent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def start_server(model: str | None, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlxllama", "serve", "--port", str(port), *extra]
    if model:
        cmd += ["--model", model]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import httpx

    end = time.monotonic() + 300
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not come up in 300 s")


BAD_BODIES = [
    b"{not json",
    json.dumps({"messages": "hello"}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "hi"}], "stop": ["x"] * 5000}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}).encode(),
    b"\xff\xfe\xfd invalid utf-8",
    json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 10**6}).encode(),
    b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    ("[" * 10000 + "]" * 10000).encode(),
]


async def client_loop(i: int, base: str, model: str, deadline: float, stats: dict, max_tokens: int,
                      min_done: int = 0) -> None:
    import httpx

    rng = random.Random(i)
    async with httpx.AsyncClient(base_url=base, timeout=300) as http:
        while time.monotonic() < deadline or (stats["completed"] + stats["cancelled"] < min_done
                                              and time.monotonic() < deadline + 120):
            kind = rng.choices(["plain", "stream", "cancel", "bad"], weights=[4, 4, 2, 1])[0]
            body = {"model": model, "messages": [{"role": "user", "content": f"client {i}: tell me about {rng.random()}"}],
                    "max_tokens": rng.randint(4, max_tokens), "temperature": 0}
            t = time.monotonic()
            try:
                if kind == "bad":
                    r = await http.post("/v1/chat/completions", content=rng.choice(BAD_BODIES),
                                        headers={"content-type": "application/json"})
                    stats["bad_ok" if 400 <= r.status_code < 500 else "bad_wrong"] += 1
                    if r.status_code >= 500:
                        stats["5xx"] += 1
                    continue
                if kind == "plain":
                    r = await http.post("/v1/chat/completions", json=body)
                    status = r.status_code
                    ok = status == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
                else:
                    body["stream"] = True
                    ok, status = False, 0
                    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                        status = r.status_code
                        n = 0
                        async for line in r.aiter_lines():
                            if kind == "cancel" and line.startswith("data:"):
                                n += 1
                                if n >= rng.randint(1, 3):
                                    break  # hang up mid-answer
                            if line.strip() == "data: [DONE]":
                                ok = True
                        if kind == "cancel":
                            stats["cancelled"] += 1
                            continue
                if status in (429, 503):
                    stats["turned_away"] += 1
                elif ok:
                    stats["completed"] += 1
                    stats["latencies"].append(time.monotonic() - t)
                else:
                    stats["lost"] += 1
                    if status >= 500:
                        stats["5xx"] += 1
            except httpx.HTTPError as e:
                stats["lost"] += 1
                stats["errors"].append(f"{kind}: {type(e).__name__}")


async def soak(base: str, model: str, clients: int, seconds: float, max_tokens: int, min_done: int = 0) -> dict:
    """min_done: go on past `seconds` (at most 120 s more) until that many requests completed or hung up."""
    stats = {"completed": 0, "turned_away": 0, "cancelled": 0, "bad_ok": 0, "bad_wrong": 0, "lost": 0, "5xx": 0,
             "latencies": [], "errors": []}
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(client_loop(i, base, model, deadline, stats, max_tokens, min_done) for i in range(clients)))
    return stats


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the default model)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--warmup", type=float, default=10, help="seconds of warm-up before RSS is measured")
    p.add_argument("--warmup-requests", type=int, default=400,
                   help="and at least this many requests in the warm-up (a slow machine takes longer)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--max-growth", type=float, default=5.0, help="percent of RSS growth after warm-up allowed")
    p.add_argument("--server-arg", action="append", default=[], help="extra `mlxllama serve` argument (repeatable)")
    p.add_argument("--json", default=None, help="write the figures to this file")
    a = p.parse_args()

    import httpx

    port = free_port()
    proc = start_server(a.model, port, a.server_arg)
    base = f"http://127.0.0.1:{port}"
    try:
        model = httpx.get(base + "/v1/models").json()["data"][0]["id"]
        # warm-up: allocator, MLX's buffers for the batch shapes, the prefix cache
        asyncio.run(soak(base, model, a.clients, a.warmup, a.max_tokens, a.warmup_requests))
        rss_start = rss_mb(proc.pid)
        stats = asyncio.run(soak(base, model, a.clients, a.seconds, a.max_tokens))
        time.sleep(1.0)
        rss_end = rss_mb(proc.pid)
        alive = proc.poll() is None and httpx.get(base + "/health", timeout=10).status_code == 200
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    lat = stats.pop("latencies")
    out = {**stats, "errors": stats["errors"][:10], "clients": a.clients, "seconds": a.seconds,
           "p50_s": percentile(lat, 0.5), "p99_s": percentile(lat, 0.99), "rss_start_mb": round(rss_start, 1),
           "rss_end_mb": round(rss_end, 1), "rss_growth_pct": round(100 * (rss_end - rss_start) / rss_start, 2),
           "server_alive": alive}
    print(json.dumps(out, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    failed = (out["lost"] or out["5xx"] or out["bad_wrong"] or not alive or out["rss_growth_pct"] > a.max_growth)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
