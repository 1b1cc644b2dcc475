"""LoRA training speed and peak memory: `mlxllama lora` against `mlx_lm.lora`, same data, model, settings.

Each trainer runs in its own subprocess on the same JSONL data, batch size, rank, layers, learning
rate and number of steps; both load MKL through mlxllama._platform before mlx.core (the same
BLAS), and mlx-lm computes in float32 (its CPU backend is far slower in fp16/bf16).

The two trainers count tokens differently (mlx-lm counts those in its loss mask, plus one per
example), so speed is measured on the clock: the median seconds per step after the first
`--warmup-steps`, and tokens/s = the data's mean tokens per step (every example once per epoch,
tokenized with the model's tokenizer) / that median. Validation is excluded in both.

Scenarios (each with --repeats alternating runs of the two dense trainers; the best run is kept,
since other processes share these CPUs):
  text   {"text"} lines, loss on every token
  chat   {"messages"} with a system and user turn and a short answer; loss on the answer only
         (mlxllama's default; --mask-prompt for mlx-lm)
Runs:
  mlxllama          the default 4-bit model; on CPU the frozen base runs dense (its default)
  mlx-lm dense      mlx_lm.lora on a float32 dequantized copy of the same model (the same math)
  mlx-lm 4-bit      mlx_lm.lora on the 4-bit model as is (text only; slow on CPU, so fewer steps)

    python benchmarks/bench_lora.py [--iters 10] [--repeats 2] [--scenarios text,chat] [--skip-quantized]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the model reads a sentence about rivers mountains and small towns where people trade bread "
         "fish wool and stories every market day while the weather changes slowly over the hills").split()

MLX_LM_WRAPPER = r"""
import json, sys
import mlxllama._platform  # the same BLAS as mlxllama (before mlx.core)
import mlx.core as mx
import mlx_lm.lora as L

class Report:
    def on_train_loss_report(self, info):
        print("BENCH " + json.dumps(info), flush=True)
    def on_val_loss_report(self, info):
        pass

L.get_reporting_callbacks = lambda *a, **k: Report()
_load = L.load
def load_float32(*a, **k):
    model, tok = _load(*a, **k)
    model.set_dtype(mx.float32)
    return model, tok
L.load = load_float32
sys.argv = ["mlx_lm.lora", *sys.argv[1:]]
L.main()
print("BENCH_PEAK " + json.dumps({"peak_memory": mx.get_peak_memory() / 1e9}), flush=True)
"""


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def make_data(folder: Path, scenario: str, n: int, words: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n), ("valid", 4)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for _ in range(count):
                if scenario == "text":
                    row = {"text": sentence(rng, words)}
                else:  # a prompt-heavy instruction example: most tokens are masked out of the loss
                    row = {"messages": [
                        {"role": "system", "content": "Answer from the passage. " + sentence(rng, words // 2)},
                        {"role": "user", "content": sentence(rng, words // 2) + "?"},
                        {"role": "assistant", "content": sentence(rng, max(words // 6, 4)) + "."}]}
                f.write(json.dumps(row) + "\n")


def tokens_per_step(model: Path, data: Path, batch_size: int) -> float:
    from mlxllama.tokenizer import load_tokenizer

    tok = load_tokenizer(model)
    lengths = []
    for line in (data / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "text" in row:
            lengths.append(len(tok.encode(row["text"])) + 1)  # + EOS
        else:
            lengths.append(len(tok.apply_chat_template(row["messages"], add_generation_prompt=False, tokenize=True)))
    return statistics.fmean(lengths) * batch_size


def dense_copy(model_dir: Path, out: Path) -> Path:
    """A float32 copy of the quantized model (dequantized weights: the values the 4-bit matmul uses)."""
    if (out / "config.json").is_file():
        return out
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxllama.loader import load_model, read_json

    model, _ = load_model(model_dir, dtype="float32", dense=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    config = read_json(model_dir / "config.json")
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    config["torch_dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for f in model_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("generation_config.json", "special_tokens_map.json"):
            shutil.copy2(f, tmp / f.name)
    os.rename(tmp, out)
    return out


def median_after(values: list[float], skip: int) -> float:
    kept = values[skip:] or values
    return statistics.median(kept)


def run_ours(model: Path, data: Path, out: Path, a, mask: bool) -> dict:
    cmd = [sys.executable, "-m", "mlxllama", "lora", "--model", str(model), "--data", str(data),
           "--adapter-path", str(out), "--iters", str(a.iters), "--batch-size", str(a.batch_size),
           "--num-layers", str(a.num_layers), "--rank", str(a.rank), "--learning-rate", "1e-4", "--warmup", "0",
           "--max-seq-length", str(a.max_seq_length), "--steps-per-report", "1", "--steps-per-eval", "100000",
           "--save-every", "100000", "--val-batches", "1", "--mask-prompt" if mask else "--no-mask-prompt", "--quiet"]
    tic = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if r.returncode != 0:
        raise SystemExit(f"mlxllama lora failed:\n{r.stderr[-3000:]}")
    log = [json.loads(x) for x in (out / "loss_log.jsonl").read_text().splitlines()]
    train = [x for x in log if "train_loss" in x]
    return {"step_s": median_after([x["train_seconds"] for x in train], a.warmup_steps),
            "peak_gb": max(x["peak_memory_gb"] for x in train), "wall_s": round(wall, 1),
            "loss": (round(train[0]["train_loss"], 3), round(train[-1]["train_loss"], 3)), "steps": len(train)}


def run_mlx_lm(model: Path, data: Path, out: Path, a, iters: int, mask: bool) -> dict:
    cmd = [sys.executable, "-c", MLX_LM_WRAPPER, "--train", "--model", str(model), "--data", str(data),
           "--adapter-path", str(out), "--iters", str(iters), "--batch-size", str(a.batch_size),
           "--num-layers", str(a.num_layers), "--learning-rate", "1e-4", "--max-seq-length", str(a.max_seq_length),
           "--steps-per-report", "1", "--steps-per-eval", "100000", "--save-every", "100000", "--val-batches", "1"]
    if mask:
        cmd.append("--mask-prompt")
    if a.rank != 8:
        cfg = out.with_suffix(".yaml")
        cfg.write_text(f"lora_parameters: {{rank: {a.rank}, scale: 20.0, dropout: 0.0}}\n")
        cmd += ["--config", str(cfg)]
    tic = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    wall = time.perf_counter() - tic
    if r.returncode != 0:
        raise SystemExit(f"mlx_lm.lora failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    reports = [json.loads(line[6:]) for line in r.stdout.splitlines() if line.startswith("BENCH ")]
    peak = [json.loads(line[11:]) for line in r.stdout.splitlines() if line.startswith("BENCH_PEAK ")]
    return {"step_s": median_after([1 / x["iterations_per_second"] for x in reports], a.warmup_steps),
            "peak_gb": max([x["peak_memory"] for x in reports] + [p["peak_memory"] for p in peak]),
            "wall_s": round(wall, 1), "loss": (round(reports[0]["train_loss"], 3), round(reports[-1]["train_loss"], 3)),
            "steps": len(reports)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="4-bit model folder (default: the default model)")
    p.add_argument("--scenarios", default="text,chat")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of the two dense trainers (best kept)")
    p.add_argument("--quantized-iters", type=int, default=3, help="steps for the slow mlx-lm 4-bit run")
    p.add_argument("--skip-quantized", action="store_true", help="skip mlx_lm.lora on the 4-bit model")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-layers", type=int, default=16)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--words", type=int, default=60, help="words per example (about one token each)")
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the median")
    p.add_argument("--json", action="store_true", help="print the results as JSON too")
    a = p.parse_args()

    from mlxllama.paths import cache_home
    from mlxllama.resolve import default_model_path

    model = Path(a.model) if a.model else default_model_path()
    dense = dense_copy(model, cache_home() / "bench" / f"{model.name}-lora-float32")
    work = Path(tempfile.mkdtemp(prefix="bench_lora_"))
    print(f"model {model.name}; batch {a.batch_size}, {a.num_layers} layers, rank {a.rank}, {a.iters} steps; "
          f"time per step = median after {a.warmup_steps} steps", flush=True)
    rows = []
    for scenario in a.scenarios.split(","):
        data = work / scenario
        make_data(data, scenario, a.iters * a.batch_size, a.words)  # one epoch: every example once
        per_step = tokens_per_step(model, data, a.batch_size)
        mask = scenario == "chat"
        runs: dict[str, list[dict]] = {"mlxllama": [], "mlx-lm dense": []}
        for i in range(a.repeats):
            runs["mlxllama"].append(run_ours(model, data, work / f"ours-{scenario}-{i}", a, mask))
            print(f"  {scenario} mlxllama      {runs['mlxllama'][-1]}", flush=True)
            runs["mlx-lm dense"].append(run_mlx_lm(dense, data, work / f"mlx-lm-{scenario}-{i}", a, a.iters, mask))
            print(f"  {scenario} mlx-lm dense  {runs['mlx-lm dense'][-1]}", flush=True)
        best = {name: min(rs, key=lambda r: r["step_s"]) for name, rs in runs.items()}
        if scenario == "text" and not a.skip_quantized:
            best["mlx-lm 4-bit"] = run_mlx_lm(model, data, work / "mlx-lm-4bit", a, a.quantized_iters, mask)
            print(f"  {scenario} mlx-lm 4-bit  {best['mlx-lm 4-bit']}", flush=True)
        for name, r in best.items():
            r["tok_s"] = per_step / r["step_s"]
            rows.append((scenario, name, r, best["mlxllama"]["step_s"]))
        print(f"  {scenario}: {per_step:.0f} tokens per step", flush=True)

    weights = {"mlxllama": "4-bit, run dense", "mlx-lm dense": "float32 copy", "mlx-lm 4-bit": "4-bit as is"}
    print("\n| data | trainer | base weights | s/step | train tok/s | peak memory GB | mlxllama speed-up |")
    print("|---|---|---|---|---|---|---|")
    for scenario, name, r, ours_step in rows:
        print(f"| {scenario} | {name} | {weights[name]} | {r['step_s']:.2f} | {r['tok_s']:.0f} | "
              f"{r['peak_gb']:.2f} | {r['step_s'] / ours_step:.2f}x |")
    if a.json:
        print(json.dumps([{"data": s, "trainer": n, **r} for s, n, r, _ in rows]))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
