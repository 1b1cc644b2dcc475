"""`mlxllama bench`: our speed beside mlx-lm's (and llama.cpp's), measured in the same run.

    result = run_bench(BenchOptions(models=["default"]))
    print(format_table(result)); result.to_json()

For each model (the default model, or random-weight 4-bit models shaped like Llama-3.2-1B and
Llama-3-8B) every system is measured in a fresh process (worker.py): prefill tok/s at several
prompt lengths, decode tok/s at batch 1/4/8, peak memory. Cold time to first token runs the two
CLIs as subprocesses. Prompt lookup is measured on the QA dev set's prompts (ours, plain vs lookup,
same output). Nothing here asserts a speed; report.py turns the figures into a table with ratios.
"""

from .report import format_table
from .run import BenchOptions, BenchResult, device_kind, run_bench, time_to_first_token

__all__ = ["BenchOptions", "BenchResult", "device_kind", "format_table", "run_bench", "time_to_first_token"]
