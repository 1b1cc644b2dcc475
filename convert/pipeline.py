"""convert(): source -> tensor-by-tensor quantization -> sharded, atomic MLX model folder."""

from __future__ import annotations

import collections
import math
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

from mlxllama.errors import ConversionError, InputError

from .gguf_tokenizer import write_tokenizer_files
from .hub import open_source, resolve
from .quantize import Plan, QuantSpec, check_bits, dequantize, dtype_of, quantize
from .source import Source, Tensor
from .writer import ShardWriter, atomic_output_dir, folder_size, parse_size, write_json


@dataclass
class ConvertReport:
    out: Path
    size_bytes: int
    bits_per_weight: float
    n_tensors: int            # tensors written (a quantized weight counts with its scales and biases)
    quantization: dict | None  # what config.json records, None for a float model

    def __str__(self) -> str:
        q = "float" if not self.quantization else f"{self.quantization['bits']}-bit g{self.quantization['group_size']}"
        return (f"wrote {self.out} ({q}, {self.size_bytes / 2**20:.1f} MiB, {self.bits_per_weight:.2f} bits/weight, "
                f"{self.n_tensors} tensors)")


def convert(src, out, *, bits: int | None = None, group_size: int | None = None, quantize: bool = True,
            dtype: str | None = None, recipe: str | None = None, dequantize: bool = False, keep_float: bool = False,
            max_shard_size: int | str = "5GB", force: bool = False, progress: bool = True) -> ConvertReport:
    """Convert a Hugging Face checkpoint (folder or repo id), a GGUF file or an MLX folder to an MLX folder.

    bits / group_size: affine quantization (2, 3, 4, 5, 6, 8 bits; groups of 32, 64, 128); unset means
    4 and 64 for float tensors, and already quantized tensors (GGUF, MLX) are kept as they are.
    Setting either (or a recipe) re-quantizes those too. quantize=False leaves float tensors float.
    recipe: "mixed_4_6", "mixed_3_6", "mixed_2_6" or "mixed_3_4" (6 bits for the sensitive modules).
    dtype: float16 / bfloat16 / float32 for what stays float and for scales (default: the checkpoint's).
    keep_float: GGUF types that MLX cannot hold exactly (Q6_K, Q3_K, Q2_K, IQ*) stay float16 instead of
    being re-quantized at the bits chosen for each type. dequantize: write a float model.
    Raises the typed errors of mlxllama.errors; leaves nothing behind on failure, and replaces an existing `out` only with force=True, after success.
    """
    if dequantize and (recipe is not None or bits is not None or group_size is not None):
        raise InputError("dequantize cannot be combined with bits, group_size or recipe")
    plan_bits, plan_group = (4 if bits is None else bits), (64 if group_size is None else group_size)
    check_bits(plan_bits, plan_group)
    if dtype is not None:
        dtype_of(dtype)
    max_bytes = parse_size(max_shard_size)
    out = Path(out).expanduser()
    if (out.exists() or out.is_symlink()) and not force:
        raise ConversionError(f"output {out} already exists; pass force=True (--force) to replace it")

    path = resolve(src)
    if out.resolve() == path.resolve() or path.resolve() in out.resolve().parents:
        raise InputError(f"output {out} must not be the input {path} or inside it")
    source = open_source(path, keep_float=keep_float)
    dtype_name = dtype or source.default_dtype
    plan = Plan(bits=plan_bits, group_size=plan_group, quantize=quantize, recipe=recipe, dequantize=dequantize,
                keep_packed=bits is None and group_size is None and recipe is None,
                num_layers=source.config["num_hidden_layers"])
    return _write(source, out, plan, dtype_name, max_bytes, force, progress)


def _convert_tensor(t: Tensor, plan: Plan, dt) -> tuple[dict[str, mx.array], QuantSpec | bool | None]:
    target = plan.target(t.name, t.shape, t.packed, t.hint)
    arrays = t.fetch()
    module = t.name.rsplit(".", 1)[0]
    if t.packed is not None:
        w, scales, biases = arrays
        if target == t.packed:
            return {t.name: w, f"{module}.scales": scales.astype(dt), f"{module}.biases": biases.astype(dt)}, target
        w = dequantize(w, scales, biases, t.packed)
    else:
        (w,) = arrays
    if mx.issubdtype(w.dtype, mx.floating):
        w = w.astype(dt)
    if isinstance(target, QuantSpec):
        wq, scales, biases = quantize(w, target)
        return {t.name: wq, f"{module}.scales": scales, f"{module}.biases": biases}, target
    return {t.name: w}, target


def quantization_config(specs: dict[str, QuantSpec | bool], preferred: QuantSpec) -> dict | None:
    """mlx-lm's config entry: defaults plus per-module overrides ({group_size, bits} or false)."""
    used = collections.Counter(s for s in specs.values() if isinstance(s, QuantSpec))
    if not used:
        return None
    top = max(used.values())
    default = preferred if used.get(preferred) == top else next(s for s, c in used.items() if c == top)
    q: dict = {"group_size": default.group_size, "bits": default.bits, "mode": "affine"}
    for module in sorted(specs):
        s = specs[module]
        if s is False:
            q[module] = False
        elif s != default:
            q[module] = s.as_dict()
    return q


def _write(source: Source, out: Path, plan: Plan, dtype_name: str, max_bytes: int, force: bool,
           progress: bool) -> ConvertReport:
    dt = dtype_of(dtype_name)
    specs: dict[str, QuantSpec | bool] = {}
    n_params = n_bytes = n_tensors = 0
    with atomic_output_dir(out, force) as tmp:
        writer = ShardWriter(tmp, max_bytes, {"format": "mlx"})
        bar = tqdm(total=len(source.tensors), desc=f"converting {source.path.name}", unit="tensor",
                   disable=not progress, leave=False)
        try:
            for i, t in enumerate(source.tensors):
                arrays, target = _convert_tensor(t, plan, dt)
                source.tensors[i] = None  # drop the fetcher: nothing keeps the input tensor alive
                mx.eval(*arrays.values())
                writer.add(arrays)
                if target is not None:
                    specs[t.name.rsplit(".", 1)[0]] = target
                n_params += math.prod(t.shape)
                n_bytes += sum(a.nbytes for a in arrays.values())
                n_tensors += len(arrays)
                bar.update()
        finally:
            bar.close()
        writer.finish(total_parameters=n_params)
        q = quantization_config(specs, plan.default)
        config = dict(source.config)
        config["torch_dtype"] = dtype_name
        if "dtype" in config:
            config["dtype"] = dtype_name
        if q:
            config["quantization"], config["quantization_config"] = q, dict(q)
        write_json(tmp / "config.json", config, sort_keys=True)
        _write_side_files(source, tmp)
    return ConvertReport(out, folder_size(out), n_bytes * 8 / max(n_params, 1), n_tensors, q)


def _write_side_files(source: Source, folder: Path) -> None:
    if source.gguf_metadata is not None:
        write_tokenizer_files(source.gguf_metadata, folder, source.path)
        gen = {k: source.config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in source.config}
        write_json(folder / "generation_config.json", gen)
        return
    for name, path in source.files.items():
        shutil.copyfile(path, folder / name)
    if not any(n in source.files for n in ("tokenizer.json", "tokenizer.model")):
        warnings.warn(f"{source.path} has no tokenizer.json or tokenizer.model; the output has no tokenizer")

