"""Structured output: what a JSON schema costs and what it buys, in one run.

    python benchmarks/bench_structured.py                  # default model, 6 prompts
    python benchmarks/bench_structured.py --prompts 20 --max-tokens 128

For the same prompts (each one shows the schema in the prompt, so the unconstrained runs have a
fair chance) and the same nested schema, it measures:

- grammar compile time: the first compile (builds the tokenizer's tables) and a later one;
- decode tokens/s of our generate with the schema enforced (with and without fast-forward of
  forced tokens), and without it;
- how often the output parses as JSON and validates, for ours constrained, ours unconstrained and
  mlx-lm (which enforces no schema) on the same model folder.

Greedy decoding throughout. Timings on a shared CPU are noisy: compare the ratios of one run.
Results go to $OUT (or benchmarks/results/) as structured-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlxllama  # noqa: E402  (first: the optimized BLAS before mlx.core)

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 20},
            "country": {"type": "string", "maxLength": 20},
        }, "required": ["city", "country"], "additionalProperties": False},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1, "maxItems": 3},
        "employed": {"type": "boolean"},
    },
    "required": ["name", "age", "address", "hobbies", "employed"],
    "additionalProperties": False,
}
SUBJECTS = ["a doctor", "a pilot", "a farmer", "a student", "a painter", "a chef", "a teacher", "a baker",
            "a singer", "a nurse", "a sailor", "a writer", "a judge", "a dancer", "a miner", "a poet",
            "a tailor", "a driver", "a monk", "a clerk"]


def valid(text: str) -> tuple[bool, bool]:
    """(parses as JSON, validates against SCHEMA)."""
    import jsonschema

    try:
        value = json.loads(text)
    except ValueError:
        return False, False
    try:
        jsonschema.validate(value, SCHEMA)
    except jsonschema.ValidationError:
        return True, False
    return True, True


def timed(records) -> tuple[str, int, float]:
    """A stream of response records -> (text, generated tokens, decode seconds)."""
    text, last = "", None
    for last in records:
        text += last.text
    seconds = last.generation_tokens / last.generation_tps if last.generation_tps else 0.0
    return text, last.generation_tokens, seconds


def plain(constraint):
    processor = constraint.processor()
    return lambda tokens, logits: processor(tokens, logits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the default model)")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--no-mlx-lm", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    import mlx.core as mx

    from mlxllama.constrain import compile_constraint

    model, tokenizer = mlxllama.load(args.model)
    schema_text = json.dumps(SCHEMA)
    questions = [f"Describe {SUBJECTS[i % len(SUBJECTS)]} as a JSON object following this JSON schema: {schema_text}"
                 for i in range(args.prompts)]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True) for q in questions]

    tic = time.perf_counter()
    constraint = compile_constraint(tokenizer, "json_schema", SCHEMA)
    first_compile = time.perf_counter() - tic
    tic = time.perf_counter()
    compile_constraint(tokenizer, "json_schema", SCHEMA).matcher()
    later_compile = time.perf_counter() - tic

    systems = {
        "ours, schema enforced": lambda p: timed(mlxllama.stream_generate(
            model, tokenizer, p, max_tokens=args.max_tokens, response_format=constraint)),
        # the same mask through a plain processor, which the fast-forward loop does not recognise
        "ours, enforced, no ff": lambda p: timed(mlxllama.stream_generate(
            model, tokenizer, p, max_tokens=args.max_tokens, logits_processors=[plain(constraint)])),
        "ours, unconstrained": lambda p: timed(mlxllama.stream_generate(model, tokenizer, p,
                                                                        max_tokens=args.max_tokens)),
    }
    if not args.no_mlx_lm:
        import mlx_lm

        peer, peer_tokenizer = mlx_lm.load(str(model.model_dir))
        if mx.default_device() == mx.cpu:  # the CPU computes in float32, as ours does (half types crawl there)
            peer.set_dtype(mx.float32)
            mx.eval(peer.parameters())
        systems["mlx-lm, unconstrained"] = lambda p: timed(mlx_lm.stream_generate(
            peer, peer_tokenizer, p, max_tokens=args.max_tokens))
    runs = {name: [] for name in systems}
    for i, p in enumerate(prompts):  # the systems take turns on every prompt: load on a shared machine hits them alike
        for name, run in systems.items():
            runs[name].append(run(p))
            text, n, seconds = runs[name][-1]
            print(f"prompt {i + 1}/{len(prompts)} {name}: {n} tokens, {n / max(seconds, 1e-9):.1f} tok/s", flush=True)
    rows = {name: ([r[0] for r in rs], sum(r[1] for r in rs) / max(sum(r[2] for r in rs), 1e-9))
            for name, rs in runs.items()}

    lines = [f"model: {Path(model.model_dir).name}, {args.prompts} prompts, max_tokens {args.max_tokens}, greedy",
             f"grammar compile: first {first_compile * 1000:.0f} ms (builds the token tables), "
             f"later {later_compile * 1000:.1f} ms",
             f"{'system':<24} {'decode tok/s':>12} {'parses':>8} {'validates':>10}"]
    result = {"model": str(model.model_dir), "prompts": args.prompts, "max_tokens": args.max_tokens,
              "compile_first_s": first_compile, "compile_later_s": later_compile, "systems": {}}
    for name, (texts, tps) in rows.items():
        checks = [valid(t) for t in texts]
        parses, validates = sum(c[0] for c in checks), sum(c[1] for c in checks)
        lines.append(f"{name:<24} {tps:>12.1f} {parses:>5}/{len(texts):<2} {validates:>7}/{len(texts):<2}")
        result["systems"][name] = {"decode_tps": tps, "parses": parses, "validates": validates, "outputs": texts}
    base = rows["ours, unconstrained"][1]
    for name in ("ours, schema enforced", "ours, enforced, no ff"):
        if base:
            ratio = rows[name][1] / base
            lines.append(f"{name} / ours unconstrained, decode speed: {ratio:.2f}x")
            result["systems"][name]["speed_over_unconstrained"] = ratio
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"structured-{time.strftime('%Y%m%d-%H%M')}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
