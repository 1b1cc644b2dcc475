"""Wall time and peak RSS of `convert.convert` against `mlx_lm.convert` on the same Hugging Face input.

    python benchmarks/bench_convert.py                  # the SmolLM2-135M float32 checkpoint (test fixture)
    python benchmarks/bench_convert.py --random-llama   # also a random ~0.7B-parameter float16 llama, 3 shards
    python benchmarks/bench_convert.py --model DIR --bits 4 --group-size 64

Each conversion runs in its own fresh Python process; its peak RSS comes from os.wait4 (this
driver imports nothing heavy, so the child's high-water mark is its own).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OURS = """
import sys
from mlxllama.convert import convert
convert(sys.argv[1], sys.argv[2], bits=int(sys.argv[3]), group_size=int(sys.argv[4]), progress=False)
"""
THEIRS = """
import sys
from mlx_lm import convert
convert(sys.argv[1], sys.argv[2], quantize=True, q_bits=int(sys.argv[3]), q_group_size=int(sys.argv[4]))
"""
RANDOM_LLAMA = """
import json, sys
from pathlib import Path
import numpy as np
from safetensors.numpy import save_file
out = Path(sys.argv[1]); out.mkdir(parents=True)
h, i, L, v, heads, kv = 2048, 5632, 12, 32000, 16, 4
hd = h // heads
cfg = dict(model_type="llama", hidden_size=h, intermediate_size=i, num_hidden_layers=L, num_attention_heads=heads,
           num_key_value_heads=kv, vocab_size=v, rms_norm_eps=1e-5, rope_theta=10000.0,
           max_position_embeddings=2048, tie_word_embeddings=False, torch_dtype="float16")
(out / "config.json").write_text(json.dumps(cfg))
rng = np.random.default_rng(0)
def lin(o, n):
    return (rng.standard_normal((o, n), dtype=np.float32) * 0.02).astype(np.float16)
shards = [{"model.embed_tokens.weight": lin(v, h)}, {}, {"lm_head.weight": lin(v, h), "model.norm.weight": np.ones(h, np.float16)}]
for n in range(L):
    p, s = f"model.layers.{n}.", shards[0 if n < L // 2 else 1]
    s.update({p + "input_layernorm.weight": np.ones(h, np.float16), p + "post_attention_layernorm.weight": np.ones(h, np.float16),
              p + "self_attn.q_proj.weight": lin(heads * hd, h), p + "self_attn.k_proj.weight": lin(kv * hd, h),
              p + "self_attn.v_proj.weight": lin(kv * hd, h), p + "self_attn.o_proj.weight": lin(h, heads * hd),
              p + "mlp.gate_proj.weight": lin(i, h), p + "mlp.up_proj.weight": lin(i, h), p + "mlp.down_proj.weight": lin(h, i)})
wm = {}
for k, s in enumerate(shards, 1):
    name = f"model-{k:05d}-of-00003.safetensors"
    save_file(s, str(out / name), metadata={"format": "pt"})
    wm.update({t: name for t in s})
(out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
src = Path(sys.argv[2])
for f in ("tokenizer.json", "tokenizer_config.json"):
    (out / f).write_bytes((src / f).read_bytes())
"""


def run(code: str, *args: str) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of `python -c code args` in a fresh process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", code, *args], env=env, cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    err = p.stderr.read()
    p.stderr.close()
    if status != 0:
        raise SystemExit(f"conversion failed:\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def input_size(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20


def bench(name: str, model: Path, bits: int, group_size: int, work: Path) -> dict:
    rows = {}
    for tool, code in (("mlxllama convert", OURS), ("mlx_lm.convert", THEIRS)):
        out = work / tool.replace(" ", "_").replace(".", "_")
        shutil.rmtree(out, ignore_errors=True)
        wall, rss = run(code, str(model), str(out), str(bits), str(group_size))
        rows[tool] = (wall, rss)
        shutil.rmtree(out, ignore_errors=True)
    (tw, tr), (mw, mr) = rows["mlxllama convert"], rows["mlx_lm.convert"]
    print(f"\n{name}: {model} ({input_size(model):.0f} MiB of safetensors), {bits}-bit g{group_size}")
    print(f"  {'tool':18} {'wall s':>8} {'peak RSS MiB':>13}")
    for tool, (w, r) in rows.items():
        print(f"  {tool:18} {w:8.2f} {r:13.0f}")
    print(f"  ratio ours / mlx_lm: wall {tw / mw:.2f}x, peak RSS {tr / mr:.2f}x")
    return {"model": name, "wall_ratio": tw / mw, "rss_ratio": tr / mr, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a Hugging Face checkpoint folder (default: SmolLM2-135M float32)")
    ap.add_argument("--random-llama", action="store_true", help="also a random 0.7B float16 llama in 3 shards")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    args = ap.parse_args()

    home = Path(os.environ.get("MLXLLAMA_HOME") or Path.home() / ".cache" / "mlxllama").expanduser()
    model = args.model
    if model is None:
        model = home / "test-fixtures" / "SmolLM2-135M-Instruct-hf-float32"
        if not (model / "config.json").is_file():
            sys.path.insert(0, str(ROOT))
            from mlxllama.convert import build_hf_checkpoint, fetch_default_gguf

            build_hf_checkpoint(fetch_default_gguf(home), model, dtype="float32", force=model.exists())
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        work = Path(tmp)
        results.append(bench("hf", model, args.bits, args.group_size, work))
        if args.random_llama:
            rnd = work / "random-llama"
            run(RANDOM_LLAMA, str(rnd), str(model))
            results.append(bench("random-llama", rnd, args.bits, args.group_size, work))
    print("\n" + json.dumps([{k: v for k, v in r.items() if k != "rows"} for r in results]))


if __name__ == "__main__":
    main()
