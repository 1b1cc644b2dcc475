"""LoRA fine-tuning: adapters on a frozen base (QLoRA on 4-bit weights), training, fusing.

    from mlxllama.lora import LoRAConfig, run, fuse
    run(LoRAConfig(model=..., data="data/", adapter_path="adapters", iters=200))
    model, tokenizer = mlxllama.load(model_path, adapter_path="adapters")
    fuse(model_path, "adapters", "fused-model")

Adapter folders use mlx-lm's layout, so adapters move between the two in both directions.
"""

from .adapters import load_adapters, read_adapter_config, save_adapters
from .config import LoRAConfig, make_config
from .data import load_dataset, load_split
from .fuse import fuse
from .layers import LoRALinear, apply_lora, fuse_lora, remove_lora
from .run import RunResult, run
from .trainer import Trainer, TrainResult, evaluate

__all__ = [
    "LoRAConfig", "LoRALinear", "RunResult", "Trainer", "TrainResult", "apply_lora", "evaluate", "fuse",
    "fuse_lora", "load_adapters", "load_dataset", "load_split", "make_config", "read_adapter_config",
    "remove_lora", "run", "save_adapters",
]
