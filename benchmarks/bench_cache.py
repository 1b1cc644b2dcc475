"""What the prefix cache and the quantized KV cache buy, each figure beside its peer from the same run.

    python benchmarks/bench_cache.py [--part chat qa kv] [--model DIR] [--turns 8] [--max-tokens 16]
                                     [--system-words 300] [--rounds 1] [--skip-peer] [--qa-tokens 6000]
                                     [--kv-tokens 4096]

chat: time to first token over an 8-turn chat through the server: mlxllama with its prefix cache,
mlxllama without it (--no-prompt-cache) and mlx_lm.server, same model.

The official openai client plays a chat app: every turn it resends the whole conversation (system
prompt, earlier questions and the answers it got) and streams the answer at temperature 0. The
servers run one at a time as subprocesses on 127.0.0.1 (bench_serve.py's helpers; on CPU a
quantized model is served from a dense float32 copy, by all three). Each round uses a fresh
conversation (its system prompt starts with the round number), so nothing carries over between
rounds. Printed: TTFT per turn for each server, and at the last turn the ratios
no-cache / cache and mlx_lm / cache (above 1: the prefix cache is faster).

qa: `mlxllama qa` on a document of about --qa-tokens tokens (the docs/ folder repeated), twice, each
in a new process with an empty-then-kept prompt-cache folder, plus once with --no-prompt-cache:
seconds from starting the process to the first character of the answer.

kv: one sequence with --kv-tokens of context: KV cache bytes and decode tokens/s with --kv-bits 4
and 8 against the float cache.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import dense_copy, start_server, stop_server  # noqa: E402

QUESTIONS = ["What is the first rule?", "Why does it matter?", "Give an example.", "What about the second rule?",
             "How do they relate?", "Which is harder?", "Summarise both.", "Anything else to add?",
             "And a final word?", "Thanks, one more?"]


def system_prompt(round_no: int, words: int) -> str:
    base = ("Rule one: answer briefly and precisely. Rule two: cite the section you use. The handbook covers "
            "ships, harbours, tides, weather, knots, charts and radio procedure in detail. ").split()
    text = [f"Session {round_no}."] + [base[i % len(base)] for i in range(words)]
    return " ".join(text)


def conversation(url: str, model_id: str, turns: int, max_tokens: int, round_no: int, words: int) -> list[float]:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=900)
    messages = [{"role": "system", "content": system_prompt(round_no, words)}]
    ttfts = []
    for turn in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        t0 = time.perf_counter()
        ttft, text = None, ""
        stream = client.chat.completions.create(model=model_id, messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                text += chunk.choices[0].delta.content
        ttfts.append(ttft if ttft is not None else time.perf_counter() - t0)
        messages.append({"role": "assistant", "content": text})
    return ttfts


def commands(model_dir: Path, port: int) -> dict[str, list[str]]:
    ours = [sys.executable, "-m", "mlxllama", "serve", "--model", str(model_dir), "--port", str(port),
            "--log-level", "warning"]
    peer = ("import sys, mlxllama._platform; from mlx_lm.server import main; "
            f"sys.argv = ['mlx_lm.server', '--model', {str(model_dir)!r}, '--host', '127.0.0.1', '--port', "
            f"'{port + 2}', '--log-level', 'WARNING']; main()")
    return {"cache": ours, "no-cache": [*ours[:-2], "--no-prompt-cache", "--port", str(port + 1), *ours[-2:]],
            "mlx_lm": [sys.executable, "-c", peer]}


def first_output(cmd: list[str], env: dict) -> float:
    """Seconds from starting `cmd` to the first character it prints."""
    import os
    import subprocess

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, **env})
    first = proc.stdout.read(1)
    t = time.perf_counter() - t0
    proc.stdout.read()
    proc.wait()
    if proc.returncode != 0 or not first:
        raise SystemExit(f"{' '.join(cmd[:4])} failed (exit {proc.returncode})")
    return t


def qa_part(model_dir: Path, tokens: int) -> None:
    import tempfile

    import mlxllama

    _, tokenizer = mlxllama.load(model_dir, lazy=True)
    docs = sorted((Path(__file__).resolve().parent.parent / "docs").glob("*.md"))
    text, n = "", 0
    while n < tokens:
        for d in docs:
            part = d.read_text()
            text += part + "\n\n"
            n += len(tokenizer.encode(part, add_special_tokens=False))
            if n >= tokens:
                break
    with tempfile.TemporaryDirectory() as tmp:
        doc = Path(tmp) / "document.md"
        doc.write_text(text)
        env = {"MLXLLAMA_PROMPT_CACHE": str(Path(tmp) / "prompt-cache")}
        base = [sys.executable, "-m", "mlxllama", "qa", "--model", str(model_dir), "--context", str(doc),
                "--no-answer-threshold", "off", "-n", "8"]
        print(f"\nqa: a document of {n} tokens, each question in a new process", flush=True)
        cold = first_output(base + ["How do I convert a model?"], env)
        warm = first_output(base + ["How do I start the server?"], env)
        off = first_output(base + ["How do I start the server?", "--no-prompt-cache"], env)
    print(f"  first answer character: 1st process {cold:.2f} s, 2nd process {warm:.2f} s, "
          f"2nd without the cache {off:.2f} s")
    print(f"  1st / 2nd = {cold / warm:.2f}x, no-cache / cache (2nd) = {off / warm:.2f}x")


def kv_part(model_dir: Path, tokens: int) -> None:
    import mlx.core as mx

    import mlxllama

    model, tokenizer = mlxllama.load(model_dir)
    words = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    ids = tokenizer.encode(words, add_special_tokens=False)
    prompt = (ids * (tokens // len(ids) + 1))[:tokens]
    print(f"\nkv: one sequence, {tokens} tokens of context, 32 tokens decoded", flush=True)
    rows = {}
    for bits in (None, 8, 4):
        cache = model.make_cache()
        last = None
        for last in mlxllama.stream_generate(model, tokenizer, prompt, max_tokens=32, prompt_cache=cache,
                                             kv_bits=bits):
            pass
        nbytes = sum(sum(a.nbytes for a in (x if isinstance(x, tuple) else (x,))) for c in cache for x in c.state)
        rows[bits] = (nbytes, last.generation_tps)
        print(f"  {'float' if bits is None else f'{bits}-bit'}: KV {nbytes / 2**20:.1f} MiB, "
              f"decode {last.generation_tps:.1f} tok/s", flush=True)
        mx.clear_cache()
    for bits in (8, 4):
        print(f"  {bits}-bit / float: memory {rows[bits][0] / rows[None][0]:.2f}x, "
              f"decode tok/s {rows[bits][1] / rows[None][1]:.2f}x")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: the default model)")
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--system-words", type=int, default=300, help="length of the system prompt in words")
    p.add_argument("--rounds", type=int, default=1, help="conversations per server (fresh each time)")
    p.add_argument("--port", type=int, default=8741)
    p.add_argument("--skip-peer", action="store_true", help="leave out mlx_lm.server")
    p.add_argument("--part", nargs="+", choices=["chat", "qa", "kv"], default=["chat", "qa", "kv"])
    p.add_argument("--qa-tokens", type=int, default=6000)
    p.add_argument("--kv-tokens", type=int, default=4096)
    args = p.parse_args(argv)

    import mlxllama  # noqa: F401  (first: the optimized BLAS before mlx.core)
    import mlx.core as mx
    from mlxllama.resolve import default_model_path, resolve_model
    from mlxllama.serve import model_id_for

    model_dir = resolve_model(args.model) if args.model else default_model_path()
    if "qa" in args.part:
        qa_part(model_dir, args.qa_tokens)
    if "kv" in args.part:
        kv_part(model_dir, args.kv_tokens)
    if "chat" not in args.part:
        return
    if mx.default_device() == mx.cpu:
        model_dir = dense_copy(model_dir)
    print(f"model: {model_dir}\ndevice: {mx.default_device()}, {args.turns} turns, max_tokens {args.max_tokens}, "
          f"system prompt {args.system_words} words, {args.rounds} round(s)", flush=True)
    cmds = commands(model_dir, args.port)
    names = ["cache", "no-cache"] + ([] if args.skip_peer else ["mlx_lm"])
    urls = {"cache": f"http://127.0.0.1:{args.port}", "no-cache": f"http://127.0.0.1:{args.port + 1}",
            "mlx_lm": f"http://127.0.0.1:{args.port + 2}"}
    model_id = {"cache": model_id_for(str(model_dir), str(model_dir)), "no-cache": model_id_for(str(model_dir), str(model_dir)),
                "mlx_lm": str(model_dir)}
    results: dict[str, list[list[float]]] = {n: [] for n in names}
    for name in names:
        proc = start_server(name, cmds[name], urls[name], quiet=True)
        try:
            conversation(urls[name], model_id[name], 1, 2, 999, 20)  # warm-up, another conversation
            for r in range(args.rounds):
                results[name].append(conversation(urls[name], model_id[name], args.turns, args.max_tokens, r,
                                                  args.system_words))
                print(f"  {name}, round {r + 1}: " + " ".join(f"{t:.3f}" for t in results[name][-1]), flush=True)
        finally:
            stop_server(proc)
    per_turn = {n: [statistics.median(rs[t] for rs in results[n]) for t in range(args.turns)] for n in names}
    print("\nTTFT (s), median over rounds")
    print("turn  " + "".join(f"{n:>10}" for n in names))
    for t in range(args.turns):
        print(f"{t + 1:>4}  " + "".join(f"{per_turn[n][t]:>10.3f}" for n in names))
    last = {n: per_turn[n][-1] for n in names}
    print(f"\nturn {args.turns}: no-cache / cache = {last['no-cache'] / last['cache']:.2f}x", end="")
    if "mlx_lm" in last:
        print(f", mlx_lm / cache = {last['mlx_lm'] / last['cache']:.2f}x", end="")
    print()


if __name__ == "__main__":
    main()
