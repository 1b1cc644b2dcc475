"""One `mlxllama lora` run: load the model and the splits, train, then (with test) evaluate."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import TrainingError
from .adapters import ADAPTER_FILE, load_adapters
from .config import LoRAConfig
from .data import load_split
from .trainer import Trainer, TrainResult, evaluate, stderr_log


@dataclass
class RunResult:
    train: TrainResult | None = None
    test_loss: float | None = None
    test_ppl: float | None = None


def run(config: LoRAConfig, log: Callable[[str], None] | None = None, progress: bool = True) -> RunResult:
    """Trains adapters (config.train) and/or reports test loss and perplexity (config.test).

    On the CPU backend a quantized base runs dense (exactly its dequantized values) unless
    config.dense is False: the same math, about 20x faster there.
    """
    from ..loader import load

    log = log or stderr_log
    config.validate()
    if not config.train and not config.test:
        raise TrainingError("nothing to do: pass --train and/or --test")

    def split(name):
        ds = load_split(config.data, name, tokenizer, config.mask_prompt, config.max_seq_length)
        warning = ds.warning(config.max_seq_length)
        if warning:
            log(warning)
        return ds

    model, tokenizer = load(config.model, dense=config.dense, fuse=False, train=True)
    result = RunResult()
    if config.train:
        train_set, valid_set = split("train"), split("valid")
        test_set = split("test") if config.test else None  # fail before training, not after
        result.train = Trainer(model, tokenizer, config, log=log, progress=progress).fit(train_set, valid_set)
        if result.train.interrupted:
            return result
    else:
        test_set = split("test")
        if (Path(config.adapter_path) / ADAPTER_FILE).is_file():
            load_adapters(model, config.adapter_path)
        else:
            log(f"no adapters in {config.adapter_path}: testing the base model")
    if config.test:
        result.test_loss = evaluate(model, test_set, config.batch_size, config.test_batches)
        result.test_ppl = math.exp(min(result.test_loss, 700.0))
        log(f"test loss {result.test_loss:.3f}, test perplexity {result.test_ppl:.3f}")
    return result
