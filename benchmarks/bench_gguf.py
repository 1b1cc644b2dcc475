"""GGUF import per llama.cpp quantization type: conversion time and peak RSS against the file size (and
against `mx.load` reading the same file, the peer), weight error against gguf-py's dequantization, and
next-token agreement with llama.cpp on the same file.

    pip install xllamacpp                       # llama.cpp's block quantizer and runtime, prebuilt
    python benchmarks/bench_gguf.py [--types Q4_K_M,Q5_K_M,...] [--work DIR]

The input is the default model (SmolLM2-135M-Instruct): its Q4_1 GGUF dequantized, written as an F16
GGUF with `export_gguf`, then quantized to each type by tests/gguf_quantize.py (llama.cpp's own block
quantizer with llama-quantize's tensor types: the same bytes as `llama-quantize`). Each conversion
runs in a fresh process; peak RSS is its VmHWM. llama.cpp's next tokens come from
mlxllama.bench.llamacpp (xllamacpp, or llama-cpp-python where its build decodes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_NL",
         "IQ4_XS")
TEXTS = ["The capital of France is Paris. The capital of Italy is Rome, and the capital of Spain is",
         "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
         "Water boils at 100 degrees Celsius at sea level. At higher altitudes, the air pressure is lower, so"]
HWM = 'print(int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024)'
OURS = ("import sys, mlxllama\nfrom mlxllama.convert import convert\n"
        "convert(sys.argv[1], sys.argv[2], keep_float=sys.argv[3] == '1', progress=False, force=True)\n" + HWM)
PEER = "import sys, mlx.core as mx\na = mx.load(sys.argv[1])\nmx.eval(list(a.values()))\n" + HWM


def timed(code: str, *args: str) -> tuple[float, int]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        return wall, -1
    return wall, int(r.stdout.split()[-1])


def f16_source(work: Path) -> Path:
    from mlxllama.convert import convert, export_gguf, fetch_default_gguf
    from mlxllama.paths import cache_home

    f16 = work / "SmolLM2-135M-Instruct-F16.gguf"
    if not f16.is_file():
        convert(fetch_default_gguf(cache_home()), work / "float", dequantize=True, dtype="float16", force=True,
                progress=False)
        export_gguf(work / "float", f16, force=True)
    return f16


def quantize(f16: Path, name: str, work: Path) -> Path:
    out = work / f"SmolLM2-135M-Instruct-{name}.gguf"
    if not out.is_file():
        r = subprocess.run([sys.executable, str(ROOT / "tests" / "gguf_quantize.py"), str(f16), str(out), name],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"could not quantize to {name}: {r.stderr.strip().splitlines()[-1:]}")
    return out


def agreement(folder: Path, gguf: Path) -> tuple[int, int]:
    import mlx.core as mx
    import numpy as np

    from mlxllama import load
    from mlxllama.bench import llamacpp

    model, tok = load(str(folder))
    lists = [tok.encode(text) for text in TEXTS]
    theirs = llamacpp.next_tokens(gguf, lists)
    agree = sum(int((np.array(model(mx.array([t])).astype(mx.float32)[0].argmax(-1)) == np.array(b)).sum())
                for t, b in zip(lists, theirs))
    return agree, sum(len(t) for t in lists)


def weight_error(folder: Path, gguf: Path) -> float:
    """Relative RMS error of all matrices against gguf-py's dequantization of the file."""
    import numpy as np
    from gguf import quants
    from gguf.constants import GGMLQuantizationType as T

    sys.path.insert(0, str(ROOT / "tests"))
    from test_gguf import load_dense

    from mlxllama.convert.gguf_config import hf_module, unpermute
    from mlxllama.convert.gguf_reader import GGUFFile

    g = GGUFFile(gguf)
    heads = {"attn_q": int(g.metadata["llama.attention.head_count"]),
             "attn_k": int(g.metadata["llama.attention.head_count_kv"])}
    got = load_dense(folder)
    num = den = 0.0
    for t in g.tensors:
        if len(t.shape) != 2:
            continue
        module, _, leaf = t.name.rpartition(".")
        ref = quants.dequantize(np.array(g.data(t)), T[t.type]).reshape(t.shape)
        kind = module.rsplit(".", 1)[-1]
        if kind in heads:
            ref = unpermute(ref, heads[kind])
        mine = got[f"{hf_module(module)}.{leaf}"]
        num, den = num + float(((mine - ref) ** 2).sum()), den + float((ref ** 2).sum())
    return (num / den) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--no-agreement", action="store_true", help="skip running llama.cpp")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "mlxllama" / "bench-gguf"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from mlxllama.bench import llamacpp

    peer = None if args.no_agreement else llamacpp.backend()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load average {os.getloadavg()}; llama.cpp: "
          f"{llamacpp.CAVEATS.get(peer, 'not run')}", flush=True)
    f16 = f16_source(work)
    rows = []
    for name in args.types.split(","):
        gguf = quantize(f16, name, work)
        from mlxllama.convert.gguf_reader import GGUFFile

        types = sorted({t.type for t in GGUFFile(gguf).tensors if len(t.shape) == 2})
        size = gguf.stat().st_size
        for keep in (False, True):
            if keep and not any(t in ("Q6_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS") for t in types):
                continue
            out = work / f"mlx-{name}{'-float' if keep else ''}"
            wall, rss = timed(OURS, str(gguf), str(out), "1" if keep else "0")
            peer_wall, peer_rss = timed(PEER, str(gguf))
            agree, total = (0, 0) if args.no_agreement else agreement(out, gguf)
            err = weight_error(out, gguf)
            q = json.loads((out / "config.json").read_text()).get("quantization") or {}
            rows.append((name + (" --keep-float" if keep else ""), "/".join(types), size, wall, rss, peer_wall,
                         peer_rss, err, agree, total, q.get("bits", "float")))
            print(rows[-1], flush=True)
    print("\n| file | tensor types | size MiB | ours s, peak RSS MiB | mx.load s, peak RSS MiB | "
          "weight error | next tokens = llama.cpp |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, types, size, wall, rss, pw, prss, err, agree, total, _ in rows:
        peer = f"{pw:.1f}, {prss / 2**20:.0f}" if prss > 0 else "fails"
        print(f"| {name} | {types} | {size / 2**20:.1f} | {wall:.1f}, {rss / 2**20:.0f} | {peer} | {err:.4f} | "
              f"{f'{agree}/{total}' if total else 'not run'} |")


if __name__ == "__main__":
    main()
