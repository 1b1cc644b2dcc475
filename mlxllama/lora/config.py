"""Every option of a LoRA run in one dataclass; a YAML file may hold the same options.

Precedence: command-line flags > YAML file > the defaults below. YAML keys are the field names
(dashes or underscores); mlx-lm's nested `lora_parameters: {rank, scale, dropout, keys}` and its
names `grad_accumulation_steps` / `learning_rate` are understood too, so an mlx-lm config works.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputError


@dataclass
class LoRAConfig:
    # what
    model: str | None = None  # model folder or repo id (None: the default model)
    data: str | None = None  # folder with train.jsonl, valid.jsonl [, test.jsonl]
    adapter_path: str = "adapters"
    train: bool = True
    test: bool = False
    resume: bool = False
    # adapters
    num_layers: int = 16  # the last N blocks (-1: all)
    rank: int = 8
    scale: float = 20.0  # mlx-lm's scale: y = Wx + scale * B A x
    dropout: float = 0.0
    keys: list[str] | None = None  # block-relative module paths; None: every linear of a block
    # optimisation
    learning_rate: float = 1e-4
    warmup: int | None = None  # warm-up steps (None: 5% of the steps)
    min_lr_ratio: float = 0.1  # cosine decay ends at learning_rate * min_lr_ratio
    weight_decay: float = 0.01
    batch_size: int = 4
    iters: int | None = None  # optimizer steps; None with no epochs: 1000
    epochs: float | None = None  # passes over train.jsonl (instead of iters)
    max_seq_length: int = 2048
    grad_accumulation: int = 1
    grad_checkpoint: bool = False
    seed: int = 0
    mask_prompt: bool = True  # loss only on assistant turns / completions
    # reporting
    steps_per_report: int = 10
    steps_per_eval: int = 100
    val_batches: int = 25  # -1: the whole validation set, 0: no validation
    test_batches: int = -1
    save_every: int = 100
    dense: bool | None = None  # run a quantized base dense (None: on CPU when it fits)

    def total_steps(self, n_batches: int) -> int:
        """Optimizer steps for this run, from iters or epochs (n_batches micro-batches per epoch)."""
        if self.iters is not None:
            return self.iters
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * n_batches / self.grad_accumulation))
        return 1000

    def warmup_steps(self, total: int) -> int:
        return self.warmup if self.warmup is not None else (total // 20)

    def validate(self) -> None:
        positive = ["rank", "batch_size", "max_seq_length", "grad_accumulation", "steps_per_report",
                    "steps_per_eval", "save_every"]
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.iters is not None and self.epochs is not None:
            raise InputError("give either iters or epochs, not both")
        if self.iters is not None and self.iters < 0:
            raise InputError(f"iters must be >= 0, got {self.iters}")
        if self.epochs is not None and self.epochs <= 0:
            raise InputError(f"epochs must be positive, got {self.epochs}")
        if self.learning_rate <= 0:
            raise InputError(f"learning-rate must be positive, got {self.learning_rate}")
        if self.warmup is not None and self.warmup < 0:
            raise InputError(f"warmup must be >= 0, got {self.warmup}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise InputError(f"min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.dropout < 1:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_layers == 0 or self.num_layers < -1:
            raise InputError(f"num-layers must be at least 1 (or -1 for all), got {self.num_layers}")
        if self.val_batches < -1:
            raise InputError(f"val-batches must be -1 (all), 0 (no validation) or more, got {self.val_batches}")
        if self.test_batches == 0 or self.test_batches < -1:
            raise InputError(f"test-batches must be -1 (all) or at least 1, got {self.test_batches}")
        if self.max_seq_length < 2:
            raise InputError("max-seq-length must be at least 2")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(LoRAConfig)}
ALIASES = {  # mlx-lm's names
    "grad_accumulation_steps": "grad_accumulation",
    "lora_layers": "num_layers",
    "warmup_steps": "warmup",
}
OFF_VALUES = (None, False, "", 0, [], {})  # an mlx-lm key set to one of these asks for nothing


def _mlx_lm_key(name: str, value: Any, out: dict[str, Any], where: str) -> bool:
    """mlx-lm's YAML keys that are not field names: each either maps onto our options or is refused.
    Returns False when `name` is not one of them."""
    def refuse(why: str):
        raise ConfigError(f"{where}: {name}: {why}")

    if name == "fine_tune_type":
        if value not in (None, "lora"):
            refuse(f"{value!r} is not supported (only 'lora')")
    elif name == "optimizer":
        kind = str(value).lower() if value is not None else "adamw"
        if kind == "adam":  # Adam is AdamW without weight decay
            out.setdefault("weight_decay", 0.0)
        elif kind != "adamw":
            refuse(f"{value!r} is not supported (adam or adamw)")
    elif name == "optimizer_config":
        if not isinstance(value, dict):
            refuse("must be a mapping such as {adamw: {weight_decay: 0.01}}")
        for opt, settings in value.items():
            for key, v in (settings or {}).items():
                if key == "weight_decay":
                    out["weight_decay"] = v
                else:
                    raise ConfigError(f"{where}: optimizer_config.{opt}.{key} is not supported (only weight_decay)")
    elif name == "lr_schedule":
        if value in OFF_VALUES:
            return True
        if not isinstance(value, dict) or value.get("name") != "cosine_decay":
            refuse("only {name: cosine_decay, warmup: N, arguments: [lr, steps, end_lr]} is supported")
        args = value.get("arguments") or []
        if args:
            out["learning_rate"] = float(args[0])
        if len(args) >= 3 and float(args[0]) > 0:
            out["min_lr_ratio"] = float(args[2]) / float(args[0])
        if value.get("warmup") is not None:
            out["warmup"] = value["warmup"]
        if value.get("warmup_init") not in (None, 0, 0.0):
            refuse("warmup_init is not supported (warm-up starts at 0)")
    elif name in ("report_to", "project_name", "wandb", "resume_adapter_file", "config", "hf_dataset",
                  "trust_remote_code", "clear_cache_threshold"):
        if value not in OFF_VALUES:
            refuse({"resume_adapter_file": "use --resume (the checkpoint in --adapter-path)",
                    "report_to": "reporting to external services is not supported",
                    "wandb": "reporting to external services is not supported",
                    "project_name": "reporting to external services is not supported",
                    "hf_dataset": "datasets from the Hugging Face Hub are not supported; use --data DIR",
                    "config": "nested config files are not supported",
                    "trust_remote_code": "remote code is never run",
                    "clear_cache_threshold": "not supported"}[name])
    else:
        return False
    return True


def normalize(options: dict[str, Any], where: str) -> dict[str, Any]:
    """Field names from a YAML dict: dashes to underscores, aliases, nested lora_parameters."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        name = str(key).replace("-", "_")
        name = ALIASES.get(name, name)
        if name == "lora_parameters":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: lora_parameters must be a mapping")
            if "alpha" in value and "scale" not in value:
                raise ConfigError(f"{where}: lora_parameters gives alpha; this LoRA (like mlx-lm's) uses scale")
            out.update(normalize({k: v for k, v in value.items() if k != "alpha"}, where))
            continue
        if _mlx_lm_key(name, value, out, where):
            continue
        if name not in FIELDS:
            raise ConfigError(f"{where}: unknown option {key!r}")
        out[name] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of option: value")
    return normalize(data, str(path))


def _coerce(name: str, value: Any, where: str) -> Any:
    """Checks a YAML value against the field's type (YAML reads 1e-4 as a string)."""
    if value is None:
        return None
    default = FIELDS[name].default
    kind = type(default) if default is not None and default is not dataclasses.MISSING else None
    hints = {"iters": int, "epochs": float, "warmup": int, "keys": list, "model": str, "data": str, "dense": bool}
    kind = hints.get(name, kind)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)
        if kind is list:
            if isinstance(value, str):
                return [k.strip() for k in value.split(",") if k.strip()]
            if isinstance(value, (list, tuple)):
                return [str(v) for v in value]
            raise ValueError
        if kind is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: option {name!r} has the wrong type ({value!r})") from None
    return value


def make_config(yaml_path: str | Path | None = None, **overrides: Any) -> LoRAConfig:
    """Defaults, then the YAML file, then the overrides that are not None."""
    values: dict[str, Any] = {}
    if yaml_path is not None:
        values.update({k: _coerce(k, v, str(yaml_path)) for k, v in load_yaml(yaml_path).items()})
    given = {k: v for k, v in overrides.items() if v is not None}
    for k, v in given.items():
        if k not in FIELDS:
            raise InputError(f"unknown LoRA option {k!r}")
        values[k] = _coerce(k, v, "option")
    for a, b in (("iters", "epochs"), ("epochs", "iters")):  # a flag replaces the file's other one
        if a in given and b not in given:
            values.pop(b, None)
    config = LoRAConfig(**values)
    config.validate()
    return config
