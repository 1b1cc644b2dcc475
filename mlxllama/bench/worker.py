"""One system on one model, measured in a process of its own: `python -m mlxllama.bench.worker SPEC`.

A fresh process per (system, model) keeps peak memory honest and lets each system start as a user
would start it (mlx-lm at its defaults runs without the BLAS mlxllama loads: MLXLLAMA_NO_BLAS=1).
The spec and the result are JSON; the result is the last stdout line, after RESULT_MARK.

Systems: "mlxllama" (ours, default settings; "compiled": true for the compiled decode step),
"mlx-lm" (its load/stream_generate/batch_generate; "dtype": "float32" casts its floating parameters,
its best setting on CPU), "llama.cpp" (a GGUF through mlxllama.bench.llamacpp: xllamacpp or
llama-cpp-python; batch 1 only). The llama.cpp worker runs by path, `python .../worker.py SPEC`,
so that no MLX is loaded into its process or counted in its peak memory.

Each phase is skipped, with the reason, when its estimated time would overrun the worker's budget:
slow peers (mlx-lm in bf16 on CPU) still give the figures that fit.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

RESULT_MARK = "MLXLLAMA-BENCH-RESULT "  # the same in mlxllama/bench/__init__.py (not imported: run as __main__)
now = time.perf_counter


def _load1():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _llamacpp():
    """The sibling module llamacpp.py, also when this file runs by path (no mlxllama package)."""
    if __package__:
        from . import llamacpp
    else:
        import llamacpp  # sys.path[0] is this folder
    return llamacpp


def random_prompt(n: int, vocab: int, seed: int) -> list[int]:
    import numpy as np

    return np.random.RandomState(seed).randint(0, vocab, size=n).tolist()


# --- the systems, behind one small interface ----------------------------------------------------

class Runner:
    """first_token(prompt) -> s; decode(prompt, n, cap_s) -> token times; batch(prompts, n) -> s."""

    vocab: int
    supports_batch = True

    def peak_gb(self) -> float:
        from mlxllama.memory import peak_memory_gb

        return peak_memory_gb()

    def dtype(self) -> str:
        """The dtype the model computes in: that of its first floating parameter."""
        import mlx.core as mx
        from mlx.utils import tree_flatten

        for _, p in tree_flatten(self.model.parameters()):
            if mx.issubdtype(p.dtype, mx.floating):
                return str(p.dtype).replace("mlx.core.", "")
        return "?"


class Ours(Runner):
    def __init__(self, spec):
        from mlxllama.loader import load

        self.model, self.tok = load(spec["model"], dtype=spec.get("dtype"), dense=spec.get("dense"))
        self.tok.eos_token_ids = set()  # never stop early
        self.compiled = bool(spec.get("compiled"))
        self.vocab = min(self.model.args.vocab_size, len(self.tok)) if hasattr(self.model, "args") else len(self.tok)

    def stream(self, prompt, n, **kw):
        from mlxllama.generate import stream_generate

        return stream_generate(self.model, self.tok, prompt, max_tokens=n, compiled=self.compiled, **kw)

    def batch(self, prompts, n):
        from mlxllama.generate import batch_generate

        t = now()
        batch_generate(self.model, self.tok, prompts, max_tokens=n)
        return now() - t


class MlxLm(Runner):
    def __init__(self, spec):
        import mlx.core as mx
        from mlx_lm import load

        self.model, self.tok = load(spec["model"])
        if spec.get("dtype"):
            self.model.set_dtype(getattr(mx, spec["dtype"]))
            mx.eval(self.model.parameters())
        self.tok._eos_token_ids = set()  # as mlx-lm's own benchmark does
        args = getattr(self.model, "args", None)
        self.vocab = min(getattr(args, "vocab_size", 1 << 30), len(self.tok._tokenizer))

    def stream(self, prompt, n, **kw):
        from mlx_lm import stream_generate

        return stream_generate(self.model, self.tok, prompt, max_tokens=n, **kw)

    def batch(self, prompts, n):
        from mlx_lm import batch_generate

        t = now()
        batch_generate(self.model, self.tok, prompts, max_tokens=n)
        return now() - t


class LlamaCpp(Runner):
    """llama.cpp's first-token and per-token times come from the engine (its own timings with
    xllamacpp, whose streamed chunks can hold several tokens)."""

    supports_batch = False

    def __init__(self, spec):
        lc = _llamacpp()
        n_ctx = max(spec["prefill_lengths"] + [0]) + spec["decode_prompt"] + spec["decode_tokens"] + 64
        self.backend = spec.get("llama_cpp_backend") or lc.backend()
        if self.backend is None:
            raise RuntimeError("no llama.cpp binding runs here (pip install xllamacpp)")
        self.engine = lc.open_engine(self.backend, spec["gguf"], n_ctx=max(n_ctx, 512), threads=spec.get("threads"))
        self.vocab = spec.get("vocab") or lc.vocab_size(spec["gguf"])  # from the parent: gguf-py's reader costs RSS
        self.peak_gb = lc.peak_rss_gb

    def first_token(self, prompt) -> float:
        return self.engine.first_token_s(prompt)

    def token_times(self, prompt, n: int, cap_s: float) -> list[float]:
        return self.engine.token_times(prompt, n)

    def dtype(self) -> str:
        return f"gguf ({self.backend})"


RUNNERS = {"mlxllama": Ours, "mlx-lm": MlxLm, "llama.cpp": LlamaCpp}


# --- measurements ---------------------------------------------------------------------------

def first_token_time(r: Runner, prompt) -> float:
    if hasattr(r, "first_token"):
        return r.first_token(prompt)
    t = now()
    for _ in r.stream(prompt, 1):
        break
    return now() - t


def decode_times(r: Runner, prompt, n: int, cap_s: float) -> list[float]:
    """Timestamps of each generated token; stops at n tokens or cap_s after the first one."""
    if hasattr(r, "token_times"):
        return r.token_times(prompt, n, cap_s)
    times = []
    for _ in r.stream(prompt, n):
        times.append(now())
        if len(times) >= 3 and times[-1] - times[0] > cap_s:
            break
    return times


def median_gap(times: list[float]) -> float | None:
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    return gaps[len(gaps) // 2] if len(gaps) >= 2 else None


def measure(spec: dict) -> dict:
    t0 = now()
    budget = float(spec.get("budget_s", 300))
    out: dict = {"system": spec["system"], "prefill": {}, "decode": {}, "notes": []}

    def left() -> float:
        return budget - (now() - t0)

    t = now()
    r = RUNNERS[spec["system"]](spec)
    out["load_s"] = now() - t
    out["dtype"] = r.dtype()
    vocab, seed = r.vocab, spec.get("seed", 0)

    # Warm-up (kernels, allocator, compiled graphs): a 16-token prompt gives a first prefill speed,
    # up to 8 tokens after it a first decode speed (and the decode figure for a system too slow for
    # the full run).
    warm = random_prompt(16, vocab, seed + 99)
    t = now()
    first_token_time(r, warm)
    tps = 16 / max(now() - t, 1e-6)
    n, Pd = spec["decode_tokens"], spec["decode_prompt"]
    cap = float(spec.get("decode_cap_s", 30))
    warm_times = decode_times(r, warm, 8, min(cap, max(left() / 4, 1)))
    step_s = median_gap(warm_times)

    # decode at batch 1 first: the figure the targets name
    est = Pd / tps + min(cap, n * (step_s or 1))
    if est < left() / 2:
        times = decode_times(r, random_prompt(Pd, vocab, seed + 1), n, min(cap, left() / 3))
        if len(times) >= 3:
            step_s = median_gap(times)  # robust to bursts of other work on a shared machine
            out["decode"]["1"] = 1 / step_s
            out["decode_mean_b1"] = (len(times) - 1) / (times[-1] - times[0])
            out["decode_tokens_measured"] = len(times)
    if "1" not in out["decode"] and step_s:
        out["decode"]["1"] = 1 / step_s
        out["notes"].append(f"decode batch 1: from the warm-up ({len(warm_times)} tokens after a 16-token prompt); "
                            f"the {Pd}-token run would take about {est:.0f} s")

    for P in sorted(spec["prefill_lengths"]):
        est = P / tps * 1.3
        if est > left():
            out["prefill"][str(P)] = None
            out["notes"].append(f"prefill {P}: skipped, estimated {est:.0f} s > budget left {max(left(), 0):.0f} s")
            continue
        prompt = random_prompt(P, vocab, seed + P)
        best = None
        for trial in range(max(1, spec.get("trials", 2))):
            dt = first_token_time(r, prompt)
            best = dt if best is None else min(best, dt)
            if dt * 1.2 > left():
                break
        tps = P / best
        out["prefill"][str(P)] = tps

    for B in spec.get("batch_sizes", []):
        if B == 1:
            continue
        if not r.supports_batch or step_s is None:
            out["decode"][str(B)] = None
            if not r.supports_batch:
                out["notes"].append(f"decode batch {B}: not measured for {spec['system']}")
            continue
        # decode tok/s = B (N - 1) / (T(N) - T(1)): the prompt and the first token cancel out
        N = int(max(4, min(n, cap / step_s)))
        est = 2 * B * Pd / tps + (N + 1) * step_s * 1.5
        if est > left():
            out["decode"][str(B)] = None
            out["notes"].append(f"decode batch {B}: skipped, estimated {est:.0f} s > budget left {max(left(), 0):.0f} s")
            continue
        prompts = [random_prompt(Pd, vocab, seed + 1000 * B + i) for i in range(B)]
        t1 = r.batch(prompts, 1)
        tN = r.batch(prompts, N)
        if (tN + t1) * 1.5 < left():  # a second trial when it fits; the fastest of each is kept
            t1, tN = min(t1, r.batch(prompts, 1)), min(tN, r.batch(prompts, N))
        out["decode"][str(B)] = B * (N - 1) / max(tN - t1, 1e-9)
    out["peak_memory_gb"] = r.peak_gb()
    out["elapsed_s"] = now() - t0
    out["load_average_end"] = _load1()
    return out


# --- prompt lookup on QA prompts ----------------------------------------------------------------

def qa_prompts(tok, path: str, limit: int) -> list[list[int]]:
    """The QA dev set's prompts as `mlxllama qa` lays them out (its prompt module), else a plain
    chat prompt with the context before the question."""
    items = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()][:limit]
    prompts = []
    for it in items:
        try:
            from mlxllama.qa.prompt import encode_parts, prompt_parts
            from mlxllama.qa.retrieve import Chunk

            before, after = prompt_parts(tok, [Chunk("context", 0, len(it["context"]), it["context"])])
            doc, tail = encode_parts(tok, before, it["question"], after)
            prompts.append(doc + tail)
        except Exception:
            user = f"Context:\n{it['context']}\n\nQuestion: {it['question']}\nAnswer by copying from the context."
            prompts.append(list(tok.apply_chat_template([{"role": "user", "content": user}],
                                                        add_generation_prompt=True, tokenize=True)))
    return prompts


def measure_lookup(spec: dict) -> dict:
    """Greedy decode over the QA prompts, plain and with prompt lookup, each answer to EOS or
    qa_max_tokens. Decode time = whole answer time - time to the first token (one plain run with
    max_tokens=1: the same prefill work for both), so tokens accepted together with the first one
    are not counted as free. Also: whether every output is identical."""
    from mlxllama.generate import stream_generate
    from mlxllama.loader import load
    from mlxllama.memory import rss_peak_gb

    model, tok = load(spec["model"], dtype=spec.get("dtype"))
    prompts = qa_prompts(tok, spec["qa_path"], spec.get("qa_limit", 1000))
    n_max, k = spec.get("qa_max_tokens", 64), spec.get("lookup", 4)

    def run(prompt, lookup, n=n_max):
        toks, drafted = [], 0
        t = now()
        for resp in stream_generate(model, tok, prompt, max_tokens=n, prompt_lookup=lookup):
            if resp.token >= 0:
                toks.append(resp.token)
            drafted += resp.from_draft
        return toks, now() - t, drafted

    run(prompts[0], 0), run(prompts[0], k)  # warm-up
    decode_s = {0: 0.0, k: 0.0}
    total_s = {0: 0.0, k: 0.0}
    n_tokens, same, drafted_total = 0, True, 0
    for p in prompts:
        _, t1, _ = run(p, 0, 1)
        outs = {}
        for lookup in (0, k):  # alternate, so noise hits both alike
            toks, dt, drafted = run(p, lookup)
            outs[lookup] = toks
            decode_s[lookup] += max(dt - t1, 0.0)
            total_s[lookup] += dt
            drafted_total += drafted if lookup else 0
        n_tokens += len(outs[0])
        same &= outs[0] == outs[k]
    n_decoded = n_tokens - len(prompts)  # tokens after the first of each answer
    plain = n_decoded / max(decode_s[0], 1e-9)
    fast = n_decoded / max(decode_s[k], 1e-9)
    return {"system": "mlxllama", "task": "lookup", "prompts": len(prompts), "lookup": k,
            "plain_tps": plain, "lookup_tps": fast, "ratio": fast / plain if plain else None,
            "end_to_end_ratio": total_s[0] / max(total_s[k], 1e-9),
            "same_output": same, "tokens": n_tokens, "accepted_drafts": drafted_total,
            "peak_memory_gb": rss_peak_gb()}


def main(argv=None) -> None:
    spec = json.loads((argv or sys.argv[1:])[0])
    try:
        result = measure_lookup(spec) if spec.get("task") == "lookup" else measure(spec)
    except Exception as e:  # reported, not raised: the table shows what failed and why
        result = {"system": spec.get("system"), "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                  "traceback": traceback.format_exc(limit=5)}
    sys.stdout.write("\n" + RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
