"""Speed beside mlx-lm (issue 6): the settings behind the README's performance table.

This machine (CPU or GPU), from the project root:

    python benchmarks/bench_speed.py                 # CPU: default model + Llama-3.2-1B shape
    python benchmarks/bench_speed.py --models default,llama-3.2-1b,llama-3-8b --budget 900

On the borrowed H200 (see ../shared/device/README.md; run `bash ../shared/device/pack-mlx-cuda.sh`
here first), two calls to the device tool on the same warm machine:

    call 1: bash .dev1/stage1.sh                                        carry [".dev1"]
    call 2: . .dev2/stage2.sh && PYTHONPATH=. python3 benchmarks/bench_speed.py   carry [".dev2"]

On a GPU the models are random-weight 4-bit folders shaped like Llama-3.2-1B, Llama-3-8B and
SmolLM2-135M (the default model does not travel), the systems ours, ours with the compiled decode
step, and mlx-lm at its defaults. Results go to $OUT when it is set (the device machine), else to
benchmarks/results/: speed-<device>-<date>.json and .txt, rewritten after every model so a run cut
short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlxllama.bench import BenchOptions, BenchResult, device_kind, format_table, run_bench  # noqa: E402

PRESETS = {
    # models, systems (None: the device's defaults), budget per system and model (s), ttft trials
    "cpu": dict(models="default,llama-3.2-1b", budget=420.0, ttft_trials=3),
    "gpu": dict(models="llama-3.2-1b,llama-3-8b,smollm2-135m", budget=90.0, ttft_trials=2),
}


def main() -> None:
    device = device_kind()
    preset = PRESETS[device]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=preset["models"])
    ap.add_argument("--systems", default=None, help="comma-separated (default: the device's)")
    ap.add_argument("--prefill", default="128,512,2048")
    ap.add_argument("--batch", default="1,4,8")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--budget", type=float, default=preset["budget"])
    ap.add_argument("--ttft-trials", type=int, default=preset["ttft_trials"])
    ap.add_argument("--no-ttft", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"speed-{device}-{time.strftime('%Y%m%d-%H%M')}"
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    merged: BenchResult | None = None
    for model in [m for m in args.models.split(",") if m]:
        opts = BenchOptions(
            models=[model], systems=args.systems.split(",") if args.systems else None,
            prefill_lengths=ints(args.prefill), batch_sizes=ints(args.batch), decode_tokens=args.decode_tokens,
            budget_s=args.budget, ttft=not args.no_ttft, ttft_trials=args.ttft_trials,
        )
        result = run_bench(opts)
        if merged is None:
            merged = result
        else:
            merged.models += result.models
        stem.with_suffix(".json").write_text(json.dumps(asdict(merged), indent=2) + "\n")
        table = format_table(merged)
        stem.with_suffix(".txt").write_text(table + "\n")
        print(table, flush=True)
    print(f"wrote {stem}.json and {stem}.txt")


if __name__ == "__main__":
    main()
