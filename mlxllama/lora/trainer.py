"""The LoRA training loop: AdamW with warm-up and cosine decay, checkpoints, resume, Ctrl-C, NaN stop.

One optimizer step = `grad_accumulation` micro-batches of `batch_size` examples. The k-th
micro-batch depends only on the data, batch size and seed (data.BatchStream), and dropout is
seeded per micro-batch, so a run resumed from a checkpoint continues exactly as the uninterrupted
run would have.

The adapter folder holds, besides mlx-lm's `adapters.safetensors` + `adapter_config.json`:
`checkpoint.safetensors` (adapters and optimizer state; the step in its metadata),
`trainer_state.json`, `loss_log.jsonl` and `loss_curve.png`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from ..device import wired_limit  # noqa: F401  (Metal: the working set wired for the run)
from ..errors import TrainingError
from .adapters import (
    ADAPTER_FILE, CONFIG_FILE, adapter_config, adapter_weights, read_adapter_config, save_adapters,
    save_safetensors_atomic, write_json_atomic,
)
from .config import LoRAConfig
from .data import BatchStream, Dataset, eval_batches
from .layers import apply_lora, block_linears, resolve_keys
from .report import LOG_FILE, PLOT_FILE, LossLog, plot_losses

CHECKPOINT_FILE = "checkpoint.safetensors"
STATE_FILE = "trainer_state.json"


def stderr_log(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


@dataclass
class TrainResult:
    adapter_path: Path
    step: int  # optimizer steps done (all runs together)
    total_steps: int
    first_train_loss: float | None = None  # the first reported training loss of this run
    train_loss: float | None = None  # the last reported one
    val_loss: float | None = None
    interrupted: bool = False
    tokens_per_sec: float = 0.0  # over this run's training steps (validation excluded)
    trained_tokens_per_sec: float = 0.0  # counting only tokens inside the loss mask
    peak_memory_gb: float = 0.0
    log: list[dict] = field(default_factory=list)


# -- loss and evaluation ----------------------------------------------------------------------


def split_model(model: nn.Module):
    """(body, head) for our Llama-family model: hidden states, then the output projection."""
    from ..models.llama import Model

    if not isinstance(model, Model):
        return None
    head = model.model.embed_tokens.as_linear if model.args.tie_word_embeddings else model.lm_head
    return model.model, head


def masked_loss(model: nn.Module, inputs: mx.array, targets: mx.array, weights: mx.array,
                positions: mx.array | None = None, position_weights: mx.array | None = None):
    """Mean cross-entropy over the tokens the mask keeps; returns (loss, number of those tokens).

    With `positions` (flat indices of the kept targets) the output projection and softmax run only
    there: with a masked prompt that is most of the vocabulary-sized work saved.
    """
    parts = split_model(model) if positions is not None else None
    if parts is None:
        logits = model(inputs)  # (B, T, V)
        ce = nn.losses.cross_entropy(logits, targets) * weights  # (B, T)
        ntoks = weights.sum()
    else:
        body, head = parts
        h = body(inputs)  # (B, T, D)
        h = h.reshape(-1, h.shape[-1])[positions]  # (K, D)
        ce = nn.losses.cross_entropy(head(h), targets.reshape(-1)[positions]) * position_weights  # (K,)
        ntoks = position_weights.sum()
    return ce.astype(mx.float32).sum() / mx.maximum(ntoks, 1.0), ntoks


def batch_arrays(batch) -> tuple[mx.array, ...]:
    """The loss's array arguments for a batch (positions only when they skip a good share of the work)."""
    arrays = (mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.weights))
    if len(batch.positions) < 0.8 * batch.weights.size:
        arrays += (mx.array(batch.positions), mx.array(batch.position_weights))
    return arrays


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int, max_batches: int = -1) -> float:
    """Average per-token loss over (up to max_batches) batches of the dataset."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for batch in eval_batches(dataset, batch_size, max_batches):
        loss, ntoks = masked_loss(model, *batch_arrays(batch))
        mx.eval(loss, ntoks)
        total += loss.item() * ntoks.item()
        count += ntoks.item()
    if was_training:
        model.train()
    return total / count if count else float("nan")


# -- pieces of the loop -----------------------------------------------------------------------


def make_schedule(learning_rate: float, total: int, warmup: int, min_lr_ratio: float):
    """Linear warm-up to learning_rate over `warmup` steps, then cosine decay to lr * min_lr_ratio."""
    cosine = optim.cosine_decay(learning_rate, max(total - warmup, 1), end=learning_rate * min_lr_ratio)
    if warmup <= 0:
        return cosine

    def warm(step):
        return learning_rate * (step.astype(mx.float32) + 1) / (warmup + 1)

    return optim.join_schedules([warm, cosine], [warmup])


@functools.lru_cache(maxsize=None)
def _checkpointed_class(cls: type) -> type:
    """A subclass whose __call__ recomputes the block's activations in the backward pass."""
    call = cls.__call__

    def __call__(self, *args, **kwargs):
        def inner(params, *args, **kwargs):
            self.update(params)
            return call(self, *args, **kwargs)

        return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

    return type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__})


@contextlib.contextmanager
def gradient_checkpointing(layers, enabled: bool):
    """Turns on mx.checkpoint for these block instances only, and back off afterwards."""
    swapped = []
    if enabled:
        for layer in layers:
            swapped.append((layer, type(layer)))
            layer.__class__ = _checkpointed_class(type(layer))
    try:
        yield
    finally:
        for layer, cls in swapped:
            layer.__class__ = cls


class StopFlag:
    requested = False


@contextlib.contextmanager
def stop_on_sigint(flag: StopFlag, log: Callable[[str], None]):
    """First Ctrl-C: finish the step, save a checkpoint, stop. Second: KeyboardInterrupt at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True
        log("interrupt: saving a checkpoint after this step (Ctrl-C again to quit without saving)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def read_checkpoint(path: Path) -> tuple[dict[str, mx.array], dict, int]:
    """(arrays, trainer_state, step) from an adapter folder, or TrainingError saying why not."""
    file, state_file = path / CHECKPOINT_FILE, path / STATE_FILE
    if not file.is_file() or not state_file.is_file():
        raise TrainingError(f"nothing to resume in {path}: no {CHECKPOINT_FILE} / {STATE_FILE} "
                            "(start without --resume)")
    try:
        arrays, metadata = mx.load(str(file), return_metadata=True)
        state = json.loads(state_file.read_text(encoding="utf-8"))
        step = int(metadata["step"])
    except Exception as e:
        raise TrainingError(f"the checkpoint in {path} cannot be read ({type(e).__name__}: {e}); "
                            "start a new run without --resume") from None
    return arrays, state, step


# -- the trainer --------------------------------------------------------------------------------


class _NoLossLog:
    """What ranks other than 0 write to the loss log: nothing."""

    def write(self, **fields) -> None:
        pass


class Trainer:
    """Adds LoRA layers to `model` as the config says and trains them (`fit`)."""

    def __init__(self, model: nn.Module, tokenizer, config: LoRAConfig, log: Callable[[str], None] | None = None,
                 progress: bool = True, compile: bool = True, on_step: Callable[[int, float], None] | None = None):
        config.validate()
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.log = log or stderr_log
        self.progress = progress
        self.compile = compile
        self.on_step = on_step  # called after every optimizer step with (step, loss)
        self.path = Path(config.adapter_path)
        self.stop = StopFlag()
        from ..distributed import world

        self.group = world()  # data parallel under mlx.launch: every rank a share of each batch
        self.rank0 = self.group is None or self.group.rank() == 0
        if not self.rank0:  # rank 0 reports and writes for all
            self.log, self.progress = (lambda message: None), False

    # adapters -------------------------------------------------------------------------------

    def lora_config(self) -> dict:
        c = self.config
        keys = resolve_keys(c.keys) or block_linears(self.model.layers[-1])
        num_layers = len(self.model.layers) if c.num_layers == -1 else c.num_layers
        training = {k: v for k, v in c.as_dict().items()
                    if k not in ("num_layers", "rank", "scale", "dropout", "keys", "resume", "train", "test")}
        return adapter_config(num_layers, c.rank, c.scale, c.dropout, keys, model=c.model, training=training)

    def check_resumable(self, lora: dict) -> None:
        if not (self.path / CHECKPOINT_FILE).is_file() or not (self.path / STATE_FILE).is_file():
            raise TrainingError(f"nothing to resume in {self.path}: no {CHECKPOINT_FILE} / {STATE_FILE} "
                                "(start without --resume)")
        saved = read_adapter_config(self.path)
        mine = {"num_layers": lora["num_layers"], **lora["lora_parameters"]}
        theirs = {"num_layers": saved.get("num_layers"), **saved.get("lora_parameters", {})}
        for k, v in mine.items():
            if theirs.get(k) != v:
                raise TrainingError(f"cannot resume: the checkpoint in {self.path} was trained with {k} = "
                                    f"{theirs.get(k)!r}, this run asks for {v!r} (use the same options, or a new "
                                    "--adapter-path)")

    def save_checkpoint(self, optimizer, step: int, total: int) -> None:
        self.last_saved = step
        if not self.rank0:
            return
        weights = adapter_weights(self.model)
        opt_state = {f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)}
        save_safetensors_atomic(self.path / CHECKPOINT_FILE, {**weights, **opt_state},
                                {"format": "mlx", "step": str(step)})
        save_adapters(self.model, self.path, self.lora)
        write_json_atomic(self.path / STATE_FILE, {"step": step, "total_steps": total,
                                                   "micro_batches": step * self.config.grad_accumulation,
                                                   "config": self.config.as_dict()})
        self.last_saved = step

    def restore(self, optimizer) -> int:
        arrays, _, step = read_checkpoint(self.path)
        weights = {k: v for k, v in arrays.items() if not k.startswith("optimizer.")}
        saved_opt = {k.removeprefix("optimizer."): v for k, v in arrays.items() if k.startswith("optimizer.")}
        from .adapters import check_adapter_weights

        check_adapter_weights(self.model, weights, str(self.path / CHECKPOINT_FILE))
        self.model.load_weights(list(weights.items()), strict=False)

        def pick(path, value):
            if path not in saved_opt:
                raise TrainingError(f"the checkpoint in {self.path} has no optimizer state {path!r}")
            return saved_opt[path]

        optimizer.state = tree_map_with_path(pick, optimizer.state)
        mx.eval(self.model.parameters(), optimizer.state)
        return step

    # the loop --------------------------------------------------------------------------------

    def _step_function(self, optimizer, accum: int):
        model = self.model
        loss_and_grad = nn.value_and_grad(model, masked_loss)

        group = self.group

        def step(arrays, prev_grad, do_update):
            (loss, ntoks), grad = loss_and_grad(model, *arrays)
            if group is not None:  # the whole batch's mean: each rank's share weighted by its tokens
                total = mx.distributed.all_sum(ntoks, group=group)
                grad = tree_map(lambda g: mx.distributed.all_sum(g * ntoks, group=group) / total, grad)
                loss, ntoks = mx.distributed.all_sum(loss * ntoks, group=group) / total, total
            if prev_grad is not None:
                grad = tree_map(lambda a, b: a + b, grad, prev_grad)
            if do_update:
                if accum > 1:
                    grad = tree_map(lambda g: g / accum, grad)
                optimizer.update(model, grad)
                grad = None
            return loss, ntoks, grad

        if not self.compile:
            return step
        state = [model.state, optimizer.state, mx.random.state]
        return functools.partial(mx.compile, inputs=state, outputs=state)(step)

    def fit(self, train_set: Dataset, valid_set: Dataset | None = None) -> TrainResult:
        c, model, log = self.config, self.model, self.log
        ranks = (self.group.rank(), self.group.size()) if self.group is not None else (0, 1)
        stream = BatchStream(train_set, c.batch_size, c.seed, *ranks)
        total = c.total_steps(len(stream))
        warmup = min(c.warmup_steps(total), total)
        self.lora = self.lora_config()
        self.path.mkdir(parents=True, exist_ok=True)
        self.last_saved = None

        mx.random.seed(c.seed)
        apply_lora(model, self.lora["num_layers"], c.rank, c.scale, c.dropout, self.lora["lora_parameters"]["keys"])
        optimizer = optim.AdamW(learning_rate=make_schedule(c.learning_rate, total, warmup, c.min_lr_ratio),
                                weight_decay=c.weight_decay)
        optimizer.init(model.trainable_parameters())
        start = 0
        if c.resume:
            self.check_resumable(self.lora)
            start = self.restore(optimizer)
            self.last_saved = start
            log(f"resuming from step {start} of {total} ({self.path})")
        elif self.rank0:
            write_json_atomic(self.path / CONFIG_FILE, self.lora)
        lossfile = (LossLog(self.path / LOG_FILE, keep_until=start if c.resume else None) if self.rank0
                    else _NoLossLog())
        n_train = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
        log(f"training {n_train / 1e6:.3f}M LoRA parameters in the last {self.lora['num_layers']} layers "
            f"({', '.join(self.lora['lora_parameters']['keys'])}); {len(train_set)} examples, "
            f"{total} steps of {c.batch_size * c.grad_accumulation} examples")

        result = TrainResult(self.path, start, total)
        step_fn = self._step_function(optimizer, c.grad_accumulation)
        state = [model.state, optimizer.state]
        mx.reset_peak_memory()

        def validate(step):
            if valid_set is None or c.val_batches == 0:
                return
            tic = time.perf_counter()
            result.val_loss = evaluate(model, valid_set, c.batch_size, c.val_batches)
            lossfile.write(step=step, val_loss=result.val_loss, val_time=time.perf_counter() - tic)
            log(f"step {step}: valid loss {result.val_loss:.3f}")

        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, unit="step", file=sys.stderr, disable=not self.progress,
                   dynamic_ncols=True, desc="lora")
        model.train()
        w_loss = w_steps = w_tokens = w_trained = 0
        w_time = run_time = run_tokens = run_trained = 0.0
        step = start
        try:
            with gradient_checkpointing(model.layers, c.grad_checkpoint), stop_on_sigint(self.stop, log), wired_limit():
                if start == 0:
                    validate(0)
                while step < total and not self.stop.requested:
                    tic = time.perf_counter()
                    grad, loss_sum, n_trained, n_tokens = None, mx.array(0.0), mx.array(0.0), 0
                    for j in range(c.grad_accumulation):
                        k = step * c.grad_accumulation + j
                        batch = stream[k]
                        mx.random.seed(c.seed * 1_000_003 + k)  # dropout: the same masks on resume
                        loss, ntoks, grad = step_fn(batch_arrays(batch), grad, j == c.grad_accumulation - 1)
                        loss_sum, n_trained = loss_sum + loss, n_trained + ntoks
                        n_tokens += batch.n_tokens
                        mx.eval(state, loss_sum, n_trained, grad)
                    step += 1
                    elapsed = time.perf_counter() - tic
                    loss_value = loss_sum.item() / c.grad_accumulation
                    if not math.isfinite(loss_value):
                        kept = (f"the last good checkpoint (step {self.last_saved}) is kept in {self.path}"
                                if self.last_saved is not None else "no checkpoint had been saved yet")
                        raise TrainingError(f"the training loss became {loss_value} at step {step}; stopped. "
                                            f"{kept}. Try a lower --learning-rate.")
                    w_loss, w_steps = w_loss + loss_value, w_steps + 1
                    w_tokens, w_trained, w_time = w_tokens + n_tokens, w_trained + n_trained.item(), w_time + elapsed
                    run_tokens, run_trained, run_time = run_tokens + n_tokens, run_trained + n_trained.item(), run_time + elapsed
                    peak = mx.get_peak_memory() / 1e9
                    bar.update(1)
                    bar.set_postfix_str(f"loss {loss_value:.3f}, {n_tokens / elapsed:.0f} tok/s, peak {peak:.2f} GB",
                                        refresh=False)
                    if step % c.steps_per_report == 0 or step == total:
                        train_loss = w_loss / w_steps
                        if result.first_train_loss is None:
                            result.first_train_loss = train_loss
                        result.train_loss = train_loss
                        lr = optimizer.learning_rate.item()
                        lossfile.write(step=step, train_loss=train_loss, learning_rate=lr,
                                       tokens_per_sec=w_tokens / w_time, trained_tokens_per_sec=w_trained / w_time,
                                       train_seconds=w_time,
                                       tokens=int(run_tokens), peak_memory_gb=peak)
                        log(f"step {step}: train loss {train_loss:.3f}, lr {lr:.2e}, "
                            f"{w_tokens / w_time:.0f} tok/s, peak memory {peak:.2f} GB")
                        w_loss = w_steps = w_tokens = w_trained = 0
                        w_time = 0.0
                    if step % c.steps_per_eval == 0 or step == total:
                        validate(step)
                    if step % c.save_every == 0 or step == total or self.stop.requested:
                        self.save_checkpoint(optimizer, step, total)
                    if self.on_step is not None:
                        self.on_step(step, loss_value)
                if self.stop.requested and self.last_saved != step:
                    self.save_checkpoint(optimizer, step, total)
        finally:
            bar.close()
        result.step = step
        result.interrupted = step < total
        result.tokens_per_sec = run_tokens / run_time if run_time else 0.0
        result.trained_tokens_per_sec = run_trained / run_time if run_time else 0.0
        result.peak_memory_gb = mx.get_peak_memory() / 1e9
        if result.interrupted:
            log(f"stopped at step {step} of {total}; checkpoint saved in {self.path} (continue with --resume)")
        elif start < total:
            log(f"saved adapters to {self.path / ADAPTER_FILE} ({result.tokens_per_sec:.0f} tok/s, "
                f"peak memory {result.peak_memory_gb:.2f} GB)")
        if not self.rank0:
            return result
        try:
            plot_losses(self.path / LOG_FILE, self.path / PLOT_FILE)
        except Exception as e:  # a plot is a nice-to-have; the adapters are saved
            log(f"warning: could not draw {PLOT_FILE}: {e}")
        from .report import read_log

        result.log = read_log(self.path / LOG_FILE)
        model.eval()
        return result
