"""`mlxllama lora` (train / test LoRA adapters) and `mlxllama fuse` (merge them into a model folder)."""

from __future__ import annotations

import sys

import click

# option name -> (click type, help). Every option defaults to None here so that a YAML file given
# with --config can supply it; the real defaults live in mlxllama.lora.config.LoRAConfig.
NUMERIC = [
    ("num-layers", int, "Adapt the last N transformer blocks (-1: all). [16]"),
    ("rank", int, "LoRA rank. [8]"),
    ("scale", float, "LoRA scale (mlx-lm's): y = Wx + scale * B(Ax). [20.0]"),
    ("dropout", float, "Dropout on the LoRA input. [0.0]"),
    ("learning-rate", float, "Peak learning rate of AdamW. [1e-4]"),
    ("warmup", int, "Linear warm-up steps before the cosine decay. [5% of the steps]"),
    ("min-lr-ratio", float, "The cosine decay ends at learning-rate * this. [0.1]"),
    ("weight-decay", float, "AdamW weight decay. [0.01]"),
    ("batch-size", int, "Examples per micro-batch. [4]"),
    ("iters", int, "Optimizer steps to train for. [1000 unless --epochs]"),
    ("epochs", float, "Passes over train.jsonl, instead of --iters."),
    ("max-seq-length", int, "Longer examples are truncated (with a warning that counts them). [2048]"),
    ("grad-accumulation", int, "Micro-batches per optimizer step. [1]"),
    ("seed", int, "Seed for the adapter init, data order and dropout. [0]"),
    ("steps-per-report", int, "Log the training loss every N steps. [10]"),
    ("steps-per-eval", int, "Validation loss every N steps. [100]"),
    ("val-batches", int, "Validation batches per evaluation (-1: all, 0: none). [25]"),
    ("test-batches", int, "Test batches for --test (-1: all). [-1]"),
    ("save-every", int, "Checkpoint every N steps. [100]"),
]


def lora_options(f):
    for name, kind, help_text in reversed(NUMERIC):
        f = click.option(f"--{name}", type=kind, default=None, help=help_text)(f)
    return f


@click.command("lora")
@click.option("--model", default=None, help="Model folder or Hugging Face repo id (default: SmolLM2-135M-Instruct).")
@click.option("--data", default=None, help="Folder with train.jsonl and valid.jsonl (test.jsonl for --test).")
@click.option("--adapter-path", default=None, help="Folder for the adapters, checkpoints and loss log. [adapters]")
@click.option("--config", "-c", "config_file", type=click.Path(dir_okay=False), default=None,
              help="YAML file with any of these options (flags given here win).")
@click.option("--train/--no-train", "train", default=None, help="Train (default) or, with --no-train --test, only test.")
@click.option("--test", is_flag=True, default=None, help="Report test loss and perplexity on test.jsonl.")
@click.option("--resume", is_flag=True, default=None, help="Continue from the checkpoint in --adapter-path.")
@click.option("--keys", default=None, help="Projections to adapt, comma separated: q,k,v,o,gate,up,down or "
              "module paths like self_attn.q_proj. [all linear layers of a block]")
@lora_options
@click.option("--grad-checkpoint/--no-grad-checkpoint", default=None, help="Recompute activations to save memory.")
@click.option("--mask-prompt/--no-mask-prompt", default=None,
              help="Loss only on assistant turns / completions (default), or on every token.")
@click.option("--dense/--no-dense", default=None,
              help="Run a quantized base as dense float weights (default: on the CPU backend, when it fits).")
@click.option("--quiet", is_flag=True, help="No progress bar; report lines only.")
def lora_command(config_file, quiet, **options):
    """Fine-tune LoRA adapters on a frozen (4-bit or float) model.

    Data: JSONL lines of {"messages": [...]}, {"prompt", "completion"} or {"text"}. Writes
    adapters.safetensors + adapter_config.json (mlx-lm's layout), checkpoint.safetensors,
    loss_log.jsonl and loss_curve.png into --adapter-path.
    """
    from ..lora import make_config, run

    options = {k.replace("-", "_"): v for k, v in options.items()}
    config = make_config(config_file, **options)
    result = run(config, progress=not quiet and sys.stderr.isatty())
    if result.train is not None and result.train.interrupted:
        sys.exit(130)


@click.command("fuse")
@click.option("--model", default=None, help="The base model folder (default: SmolLM2-135M-Instruct).")
@click.option("--adapter-path", required=True, help="Folder with adapters.safetensors and adapter_config.json.")
@click.option("--output", "-o", "--save-path", "output", required=True,
              help="The new model folder (--save-path is mlx-lm's spelling).")
@click.option("--dequantize", "--de-quantize", is_flag=True, help="Write float weights instead of quantizing again.")
@click.option("--export-gguf", "gguf_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the fused model as this GGUF file (see `mlxllama export-gguf`).")
@click.option("--force", is_flag=True, help="Replace --output (and the GGUF file) if they exist.")
def fuse_command(model, adapter_path, output, dequantize, gguf_path, force):
    """Merge LoRA adapters into the base weights and write a new model folder."""
    from ..lora import fuse

    path = fuse(model, adapter_path, output, dequantize=dequantize, force=force)
    click.echo(f"fused model written to {path}", err=True)
    if gguf_path:
        from mlxllama.convert.gguf_export import export_gguf

        click.echo(f"GGUF written to {export_gguf(path, gguf_path, force=force)}", err=True)
