"""Requests/s and time to first token of `mlxllama serve` against `mlx_lm.server`, same model, same run.

    python benchmarks/bench_serve.py [--model DIR] [--max-tokens 16] [--concurrency 1 4 8]
                                     [--requests-per-client 2] [--rounds 2] [--skip-peer]

Both servers run as subprocesses on 127.0.0.1 (only one is ever busy). For every concurrency level
C they take turns (--rounds each, alternating who goes first, so a drifting machine load hits both
alike): C client threads each send --requests-per-client streamed chat completions (temperature 0,
distinct prompts, so no prompt cache helps). Reported: requests/s (requests over wall time),
generated tokens/s, TTFT p50/p95 (request sent -> first content delta), and the ratios
mlxllama / mlx_lm (above 1 is better for mlxllama on req/s and tok/s, below 1 on TTFT).

On the CPU backend a quantized model is first written out dense in float32 (exactly the values the
quantized matmul uses) and both servers serve that copy: mlx-lm would otherwise run the float16
quantized model, which this backend runs at well under 1 token/s, and mlxllama dequantizes on load
anyway. The peer process loads the same optimized BLAS as mlxllama (mlxllama._platform) before MLX.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

TOPICS = ["the sea", "a library", "winter", "trains", "bread", "the moon", "bees", "chess", "rain", "a lighthouse",
          "tea", "mountains", "clocks", "a violin", "gardens", "bridges"]


def dense_copy(model_dir: Path) -> Path:
    """A float32, non-quantized copy of a quantized model folder (cached beside the model cache)."""
    config = json.loads((model_dir / "config.json").read_text())
    if "quantization" not in config and config.get("torch_dtype") == "float32":
        return model_dir
    from mlxllama.paths import cache_home

    out = cache_home() / "bench" / f"{model_dir.name}-float32"
    if (out / "config.json").is_file():
        return out
    import mlx.core as mx
    from mlx.utils import tree_flatten

    import mlxllama

    model, _ = mlxllama.load(model_dir, dtype="float32", dense=True, fuse=False)  # checkpoint names
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model.parameters())), metadata={"format": "mlx"})
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    config["torch_dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for f in model_dir.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors.index.json") and not f.name.endswith(".safetensors"):
            shutil.copy(f, tmp / f.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def server_commands(model_dir: Path, port: int) -> dict[str, list[str]]:
    """Both servers on the same model folder; mlx_lm behind the same BLAS preload as mlxllama."""
    peer = ("import sys, mlxllama._platform; from mlx_lm.server import main; "
            f"sys.argv = ['mlx_lm.server', '--model', {str(model_dir)!r}, '--host', '127.0.0.1', '--port', '{port}', "
            "'--log-level', 'WARNING']; main()")
    return {
        "mlxllama": [sys.executable, "-m", "mlxllama", "serve", "--model", str(model_dir), "--port", str(port),
                     "--max-batch", "8", "--max-queue", "64", "--log-level", "warning"],
        "mlx_lm": [sys.executable, "-c", peer],
    }


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("server did not come up in time")


def one_request(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """A streamed chat completion -> (ttft s, total s, content chunks)."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    t0 = time.perf_counter()
    ttft, chunks = None, 0
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or []
            if choices and choices[0].get("delta", {}).get("content"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return (ttft if ttft is not None else total), total, chunks


def run_level(url: str, concurrency: int, per_client: int, max_tokens: int, offset: int) -> dict:
    def client_loop(c: int):
        out = []
        with httpx.Client(timeout=600) as client:
            for k in range(per_client):
                i = offset + c * per_client + k
                prompt = f"Write one sentence about {TOPICS[i % len(TOPICS)]} and the number {i}."
                out.append(one_request(client, url, prompt, max_tokens))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = [r for rs in pool.map(client_loop, range(concurrency)) for r in rs]
    return {"wall": time.perf_counter() - t0, "requests": len(results), "tokens": sum(r[2] for r in results),
            "ttfts": [r[0] for r in results]}


def start_server(name: str, cmd: list[str], url: str, quiet: bool) -> subprocess.Popen:
    print(f"starting {name}: {' '.join(cmd[:5])} ...", flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if quiet else None)
    try:
        wait_ready(url, proc)
    except BaseException:
        stop_server(proc)
        raise
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def merge(parts: list[dict[str, float]], ttfts: list[float]) -> dict[str, float]:
    """Rounds of one level -> one result (rates over the summed wall time)."""
    wall = sum(p["wall"] for p in parts)
    requests = sum(p["requests"] for p in parts)
    tokens = sum(p["tokens"] for p in parts)
    ttfts = sorted(ttfts)
    return {"requests": requests, "req_s": requests / wall, "tok_s": tokens / wall,
            "ttft_p50": statistics.median(ttfts), "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
            "chunks_per_request": tokens / requests}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: the default model)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="turns each server takes per concurrency level")
    p.add_argument("--port", type=int, default=8731, help="mlxllama's port; mlx_lm gets the next one")
    p.add_argument("--skip-peer", action="store_true", help="benchmark mlxllama only")
    p.add_argument("--no-dense-copy", action="store_true", help="serve the model folder as it is, also on CPU")
    p.add_argument("--quiet", action="store_true", help="hide the servers' logs")
    args = p.parse_args(argv)

    import mlxllama  # noqa: F401  (first: the optimized BLAS before mlx.core)
    import mlx.core as mx
    from mlxllama.resolve import default_model_path, resolve_model

    model_dir = resolve_model(args.model) if args.model else default_model_path()
    if mx.default_device() == mx.cpu and not args.no_dense_copy:
        model_dir = dense_copy(model_dir)
    print(f"model: {model_dir}\ndevice: {mx.default_device()}, max_tokens {args.max_tokens}, "
          f"{args.requests_per_client} requests per client, cpu count {os.cpu_count()}")
    names = ["mlxllama"] + ([] if args.skip_peer else ["mlx_lm"])
    urls = {name: f"http://127.0.0.1:{args.port + i}" for i, name in enumerate(names)}
    procs = {}
    parts: dict[str, dict[int, list]] = {name: {c: [] for c in args.concurrency} for name in names}
    try:
        for i, name in enumerate(names):
            procs[name] = start_server(name, server_commands(model_dir, args.port + i)[name], urls[name], args.quiet)
            with httpx.Client(timeout=600) as client:  # warm-up
                one_request(client, urls[name], "Say hello.", args.max_tokens)
        for c in args.concurrency:
            for r in range(args.rounds):  # servers take turns, so drifting machine load hits both alike
                for name in (names if r % 2 == 0 else names[::-1]):
                    part = run_level(urls[name], c, args.requests_per_client, args.max_tokens, offset=1000 * r + 100 * c)
                    parts[name][c].append(part)
                    print(f"  {name}, {c} clients, round {r + 1}: {part['requests'] / part['wall']:.3f} req/s", flush=True)
    finally:
        for proc in procs.values():
            stop_server(proc)
    results = {name: {c: merge(ps, [t for p in ps for t in p["ttfts"]]) for c, ps in levels.items()}
               for name, levels in parts.items()}

    print("\n| clients | server | req/s | tok/s | TTFT p50 (s) | TTFT p95 (s) |")
    print("|---|---|---|---|---|---|")
    for c in args.concurrency:
        for name, res in results.items():
            r = res[c]
            print(f"| {c} | {name} | {r['req_s']:.3f} | {r['tok_s']:.2f} | {r['ttft_p50']:.3f} | {r['ttft_p95']:.3f} |")
    if "mlx_lm" in results:
        print("\nratios mlxllama / mlx_lm:")
        for c in args.concurrency:
            a, b = results["mlxllama"][c], results["mlx_lm"][c]
            print(f"  {c} clients: req/s x{a['req_s'] / b['req_s']:.2f}, tok/s x{a['tok_s'] / b['tok_s']:.2f}, "
                  f"TTFT p50 x{a['ttft_p50'] / b['ttft_p50']:.2f}, p95 x{a['ttft_p95'] / b['ttft_p95']:.2f}")


if __name__ == "__main__":
    main()
