"""Distributed inference: decode tokens/s and per-rank peak memory for 1, 2 and 3 ranks, ours beside
mlx-lm's `sharded_load` (its tensor parallel) under the same `mlx.launch`, same model, same run
(mlx-lm computing in float32, as ours does on CPU).

    python benchmarks/bench_distributed.py [--model DIR] [--tokens 64] [--prompt-tokens 64] [--configs 1,2:pipeline]

Each configuration runs as its own `mlx.launch -n N --backend ring` job on this machine; every
rank reports its peak RSS and rank 0 its decode speed. On one machine the ranks share its cores
and memory bandwidth, so more ranks are slower here: what the figures show is the memory split
(each rank ~1/N of the blocks) and the cost of the collectives per token.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

MARK = "BENCH-DIST "


def worker(system: str, model: str, mode: str, n_prompt: int, n_gen: int) -> None:
    import mlxllama  # noqa: F401  (the BLAS before mlx.core)
    import mlx.core as mx

    from mlxllama.memory import rss_peak_gb

    group = mx.distributed.init()
    if system == "mlxllama":
        from mlxllama import load
        from mlxllama.generate import generate_step

        llm, tok = load(model, parallel=mode if group.size() > 1 else None)

        def tokens(prompt):
            return generate_step(mx.array(prompt), llm, max_tokens=n_gen)
    else:
        from mlx_lm.generate import generate_step
        from mlx_lm.utils import load, sharded_load

        if group.size() > 1:
            llm, tok = sharded_load(model, tensor_group=group if mode == "tensor" else None,
                                    pipeline_group=group if mode == "pipeline" else None)
        else:
            llm, tok = load(model)
        llm.set_dtype(mx.float32)  # its checkpoint half type is many times slower on a CPU backend

        def tokens(prompt):
            return generate_step(mx.array(prompt), llm, max_tokens=n_gen)

    prompt = [(i * 7919) % 1000 + 100 for i in range(n_prompt)]
    for _ in tokens(prompt[:8]):  # warm-up
        break
    t0 = time.perf_counter()
    first, n = None, 0
    for n, _ in enumerate(tokens(prompt), 1):
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    peaks = mx.distributed.all_gather(mx.array([rss_peak_gb()]), group=group) if group.size() > 1 else mx.array([rss_peak_gb()])
    mx.eval(peaks)  # on every rank: the gather needs them all
    if group.rank() == 0:
        print(MARK + json.dumps({"ranks": group.size(), "decode_tps": (n - 1) / (end - first) if n > 1 else 0.0,
                                 "prefill_s": first - t0, "peak_gb": [round(x, 3) for x in peaks.tolist()]}), flush=True)


def run(system: str, model: str, n: int, mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", system, "--model", model, "--mode", mode,
           "--tokens", str(args.tokens), "--prompt-tokens", str(args.prompt_tokens)]
    if n > 1:
        launch = shutil.which("mlx.launch", path=os.path.dirname(sys.executable)) or "mlx.launch"
        cmd = [launch, "-n", str(n), "--backend", "ring", "--", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    for line in r.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    lines = [line for line in r.stderr.strip().splitlines() if "[WARN]" not in line and line.strip()]  # not the launcher's
    return {"error": (lines or ["no result"])[-1][:200]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the default model)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--configs", default="1,2:pipeline,3:tensor",
                   help="ranks[:split] to run, comma-separated (the default model splits tensor over 3 only)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="tensor", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.model, args.mode, args.prompt_tokens, args.tokens)
    if args.model is None:
        from mlxllama.resolve import default_model_path

        args.model = str(default_model_path())
    configs = [(int(c.split(":")[0]), (c.split(":") + ["tensor"])[1]) for c in args.configs.split(",")]
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; model {args.model}; {args.prompt_tokens} prompt "
          f"tokens, {args.tokens} generated, greedy; {os.cpu_count()} CPU cores; load average "
          f"{os.getloadavg()[0]:.1f} (1 min)")
    print(f"{'ranks':>5} {'split':>9} | {'mlxllama tok/s':>14} {'peak GB per rank':>20} | "
          f"{'mlx-lm tok/s':>12} {'peak GB per rank':>20} | ratio")
    for n, mode in configs:
        ours, theirs = run("mlxllama", args.model, n, mode, args), run("mlx-lm", args.model, n, mode, args)

        def fmt(r):
            if "error" in r:
                return f"{'-':>14} {r['error'][:20]:>20}"
            return f"{r['decode_tps']:>14.1f} {','.join(f'{x:.2f}' for x in r['peak_gb']):>20}"

        ratio = (f"{ours['decode_tps'] / theirs['decode_tps']:.2f}x"
                 if "error" not in ours and "error" not in theirs and theirs["decode_tps"] else "-")
        print(f"{n:>5} {mode if n > 1 else '-':>9} | {fmt(ours)} | {fmt(theirs).replace(' ' * 2, ' ', 0)} | {ratio}")
        for label, r in (("mlxllama", ours), ("mlx-lm", theirs)):
            if "error" in r:
                print(f"      {label}: {r['error']}")
    print(f"load average at the end {os.getloadavg()[0]:.1f} (1 min)")


if __name__ == "__main__":
    main()
