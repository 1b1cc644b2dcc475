"""`mlxllama convert` and `mlxllama models`."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("convert")
@click.argument("src", required=False)
@click.option("--hf-path", "hf_path", default=None, help="Same as SRC (mlx-lm's spelling).")
@click.option("--output", "-o", "--mlx-path", "out", default=None, type=click.Path(),
              help="Output model folder (--mlx-path is mlx-lm's spelling).")
@click.option("--bits", "--q-bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default=None,
              help="Bits per weight. Default: 4 (group 64) for a float source (Hugging Face, or an F16/BF16/F32 "
                   "GGUF); a quantized GGUF or MLX source keeps its own quantization unless --bits, --group-size "
                   "or --recipe is given (GGUF Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K exactly at group 32; Q6_K, "
                   "Q3_K, Q2_K and IQ types re-quantized at group 32, see docs/converting.md).")
@click.option("--group-size", "--q-group-size", type=click.Choice(["32", "64", "128"]), default=None,
              help="Quantization group size (default 64 for a float source).")
@click.option("--keep-float", is_flag=True,
              help="GGUF: keep the types MLX cannot hold exactly (Q6_K, Q3_K, Q2_K, IQ*) in float16 "
                   "instead of re-quantizing them.")
@click.option("--quantize", "-q", is_flag=True,
              help="Quantize (the default already; accepted as in mlx-lm, where -q turns quantization on).")
@click.option("--no-quantize", is_flag=True, help="Keep the weights in float.")
@click.option("--recipe", "--quant-predicate", type=click.Choice(["mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6"]),
              default=None, help="Mixed precision: more bits for embeddings, head and sensitive projections.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Dtype of what stays float (default: the checkpoint's).")
@click.option("--dequantize", "-d", is_flag=True, help="Turn a quantized MLX model back into float.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 500MB.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def convert_command(src, hf_path, out, bits, group_size, keep_float, quantize, no_quantize, recipe, dtype,
                    dequantize, max_shard_size, force):
    """Convert a Hugging Face checkpoint (folder or repo id), a .gguf file or an MLX model into a
    (quantized) MLX model folder."""
    from mlxllama.convert import convert

    from ..errors import InputError

    if src and hf_path and src != hf_path:
        raise InputError(f"two sources given: {src} and --hf-path {hf_path}")
    src = src or hf_path
    if not src:
        raise InputError("no source given: mlxllama convert SRC -o OUT (a folder, a repo id or a .gguf file)")
    if not out:
        raise InputError("no output folder given: pass -o OUT (or --mlx-path OUT)")
    if quantize and no_quantize:
        raise InputError("--quantize and --no-quantize contradict each other")
    report = convert(src, out, bits=int(bits) if bits else None, group_size=int(group_size) if group_size else None,
                     quantize=not no_quantize, dtype=dtype, recipe=recipe, dequantize=dequantize,
                     keep_float=keep_float, max_shard_size=max_shard_size, force=force, progress=True)
    click.echo(f"wrote {report.out}: {report.size_bytes / 1e6:.1f} MB, {report.bits_per_weight:.2f} bits per weight")


def describe_quantization(config: dict) -> str:
    q = config.get("quantization")
    if not q:
        return "float"
    overrides = sum(1 for v in q.values() if isinstance(v, (dict, bool)))
    text = f"{q.get('bits')}-bit g{q.get('group_size')}"
    return text + (f" (+{overrides} per-module)" if overrides else "")


@click.command("export-gguf")
@click.argument("model", required=False)
@click.option("--output", "-o", "out", required=True, type=click.Path(dir_okay=False), help="The .gguf file to write.")
@click.option("--q8", type=click.Choice(["q8_0", "f16"]), default="q8_0", show_default=True,
              help="GGUF type for 8-bit weights.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def export_gguf_command(model, out, q8, force):
    """Write an MLX model folder (default: SmolLM2-135M-Instruct) as one GGUF file for llama.cpp / Ollama:
    4-bit weights as Q4_1 and 5-bit as Q5_1 exactly, 8-bit as Q8_0 (or F16), float as F16."""
    from mlxllama.convert.gguf_export import export_gguf

    path = export_gguf(model, out, q8=q8, force=force)
    click.echo(f"wrote {path}: {path.stat().st_size / 1e6:.1f} MB")


@click.command("models")
def models_command():
    """List the models in the mlxllama cache with their size and quantization."""
    from ..paths import cache_home

    root = cache_home() / "models"
    rows = []
    for d in sorted(root.glob("*")) if root.is_dir() else []:
        cfg = d / "config.json"
        if not cfg.is_file():
            continue
        try:
            config = json.loads(cfg.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        rows.append((d.name, f"{size / 1e6:.1f} MB", describe_quantization(config), str(d)))
    if not rows:
        click.echo(f"no models in {root} (the default model is fetched on first use)")
        return
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        click.echo("  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3])
