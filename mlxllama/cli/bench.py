"""`mlxllama bench`: our speed beside mlx-lm's, measured in the same run."""

from __future__ import annotations

from pathlib import Path

import click


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


@click.command("bench")
@click.option("--models", default="default", show_default=True,
              help="Comma-separated: default, llama-3.2-1b, llama-3-8b (random 4-bit weights), or model folders.")
@click.option("--systems", default=None,
              help="Comma-separated systems: mlxllama, 'mlxllama compiled', mlx-lm, 'mlx-lm float32', llama.cpp "
                   "(default: ours and mlx-lm at its defaults, plus mlx-lm float32 on CPU / our compiled step on GPU).")
@click.option("--prefill", "prefill", default="128,512,2048", show_default=True, help="Prompt lengths for prefill.")
@click.option("--batch", "batch", default="1,4,8", show_default=True, help="Batch sizes for decode.")
@click.option("--decode-tokens", type=click.IntRange(min=4), default=128, show_default=True,
              help="Tokens to decode per run (fewer when a system is slow; see --decode-cap).")
@click.option("--decode-prompt", type=click.IntRange(min=1), default=64, show_default=True,
              help="Prompt length for the decode runs.")
@click.option("--decode-cap", type=click.FloatRange(min=1), default=30.0, show_default=True,
              help="Stop a decode run after this many seconds.")
@click.option("--trials", type=click.IntRange(min=1), default=2, show_default=True, help="Prefill trials (best kept).")
@click.option("--budget", type=click.FloatRange(min=10), default=300.0, show_default=True,
              help="Seconds per system and model; phases that would overrun it are skipped and said so.")
@click.option("--no-ttft", is_flag=True, help="Skip the cold-start time to first token (CLI subprocesses).")
@click.option("--ttft-timeout", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="Give up on a CLI's first token after this many seconds (reported as '>N s').")
@click.option("--lookup", type=click.IntRange(min=0), default=4, show_default=True,
              help="Prompt-lookup draft length for the QA measurement on the default model (0: skip).")
@click.option("--qa-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="QA prompts (JSONL with context and question; default: examples/qa_dev.jsonl).")
@click.option("--qa-limit", type=click.IntRange(min=1), default=1000, help="Use at most this many QA items.")
@click.option("--gguf", type=click.Path(exists=True, dir_okay=False), default=None,
              help="GGUF of the default model for the llama.cpp row (default: the default model's own GGUF; "
                   "llama.cpp runs through xllamacpp, or llama-cpp-python where its build decodes).")
@click.option("--no-llama-cpp", is_flag=True, help="Leave out llama.cpp even when it is installed.")
@click.option("--llama-cpp-threads", type=click.IntRange(min=1), default=None,
              help="llama.cpp's threads (default: one per CPU; on a busy machine 1 can be much faster, as "
                   "llama.cpp's thread pool spins while it waits for its cores).")
@click.option("--compiled/--no-compiled", default=None,
              help="Also measure our compiled decode step (default: on GPU only).")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Where random-weight models are written (default: the mlxllama cache).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="Also write every figure as JSON to this file ('-': stdout, instead of the table).")
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
def bench_command(models, systems, prefill, batch, decode_tokens, decode_prompt, decode_cap, trials, budget, no_ttft,
                  ttft_timeout, lookup, qa_file, qa_limit, gguf, no_llama_cpp, llama_cpp_threads, compiled, work_dir,
                  json_path, quiet):
    """Measure prefill, decode, memory and cold start beside mlx-lm (and llama.cpp), with ratios."""
    from ..bench import BenchOptions, format_table, run_bench

    opts = BenchOptions(
        models=[m.strip() for m in models.split(",") if m.strip()],
        systems=[s.strip() for s in systems.split(",") if s.strip()] if systems else None,
        prefill_lengths=_ints(prefill), batch_sizes=_ints(batch), decode_tokens=decode_tokens,
        decode_prompt=decode_prompt, decode_cap_s=decode_cap, trials=trials, budget_s=budget, ttft=not no_ttft,
        ttft_timeout_s=ttft_timeout,
        lookup=lookup, qa_path=qa_file, qa_limit=qa_limit, gguf=gguf, llama_cpp=not no_llama_cpp,
        llama_cpp_threads=llama_cpp_threads, compiled=compiled, work_dir=work_dir, progress=not quiet,
    )
    result = run_bench(opts)
    if json_path == "-":
        click.echo(result.to_json())
        return
    if json_path:
        Path(json_path).write_text(result.to_json() + "\n")
    click.echo(format_table(result))
