"""Training data: JSONL splits in three formats, tokenized with a per-token loss mask, and batches.

    chat         {"messages": [{"role": ..., "content": ...}, ...]}   rendered with the chat template
    completions  {"prompt": ..., "completion": ...}                   a user/assistant exchange
    text         {"text": ...}                                        trained on every token

With mask_prompt (the default) the loss covers only what the model should learn to write: every
assistant turn of a chat (its end-of-turn token included) and the completion. A file holds one
format; the first record decides which.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..errors import InputError, TrainingError

SPLITS = ("train", "valid", "test")
PAD_MULTIPLE = 8  # batches are padded to a multiple of this many tokens (few distinct shapes, little waste)


@dataclass
class Example:
    tokens: np.ndarray  # (n,) int32
    mask: np.ndarray  # (n,) bool: token i is a training target

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class Dataset:
    path: Path
    format: str
    examples: list[Example]
    truncated: int = 0  # examples cut to max_seq_length
    skipped: int = 0  # examples left with no target tokens after the cut (dropped)
    longest: int = 0  # longest example before the cut, in tokens
    records: int = 0

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def n_tokens(self) -> int:
        return sum(len(e) for e in self.examples)

    def warning(self, max_seq_length: int) -> str | None:
        if not self.truncated:
            return None
        text = (f"warning: {self.truncated} of {self.records} examples in {self.path.name} are longer than "
                f"max-seq-length {max_seq_length} tokens (longest {self.longest}) and were truncated")
        if self.skipped:
            text += f"; {self.skipped} of them kept no tokens to learn from and are skipped"
        return text


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for every non-blank line; a bad line raises TrainingError naming file:line."""
    records = []
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise TrainingError(f"{path} not found") from None
    with f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TrainingError(f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
                if not isinstance(record, dict):
                    raise TrainingError(f"{path}:{lineno}: each line must be a JSON object, got {type(record).__name__}")
                records.append((lineno, record))
        except UnicodeDecodeError:
            raise TrainingError(f"{path}: not UTF-8 text") from None
    return records


def detect_format(record: dict[str, Any], where: str) -> str:
    if "messages" in record:
        return "chat"
    if "prompt" in record and "completion" in record:
        return "completions"
    if "text" in record:
        return "text"
    raise TrainingError(f"{where}: a record needs 'messages' (chat), 'prompt' and 'completion' (completions) "
                        f"or 'text'; this one has {sorted(record) or 'no keys'}")


def _check_str(value: Any, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise TrainingError(f"{where}: {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise TrainingError(f"{where}: {name!r} is empty")
    return value


def _check_messages(messages: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise TrainingError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise TrainingError(f"{where}: message {i} needs a 'role' and a 'content'")
    return messages


def _eos_appended(tokenizer, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    return ids


def encode_text(tokenizer, text: str) -> tuple[list[int], np.ndarray]:
    ids = _eos_appended(tokenizer, tokenizer.encode(text, add_special_tokens=True))
    return ids, np.ones(len(ids), bool)


def encode_chat(tokenizer, messages: list[dict[str, Any]], mask_prompt: bool, tools=None) -> tuple[list[int], np.ndarray]:
    """Tokens of the whole conversation; the mask marks every assistant turn (rendered prefixes give the spans)."""
    extra = {"tools": tools} if tools else {}
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, **extra)
    if not mask_prompt:
        return ids, np.ones(len(ids), bool)
    mask = np.zeros(len(ids), bool)
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=True, **extra)) \
            if i else 0
        end = len(tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False, tokenize=True, **extra))
        mask[start:end] = True
    return ids, mask


def encode_completion(tokenizer, prompt: str, completion: str, mask_prompt: bool) -> tuple[list[int], np.ndarray]:
    """A user/assistant exchange with the chat template; prompt + completion + EOS without one."""
    if tokenizer.has_chat_template:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return encode_chat(tokenizer, messages, mask_prompt)
    head = tokenizer.encode(prompt, add_special_tokens=True)
    tail = _eos_appended(tokenizer, tokenizer.encode(completion, add_special_tokens=False))
    mask = np.concatenate([np.full(len(head), not mask_prompt), np.ones(len(tail), bool)])
    return head + tail, mask


def encode_record(tokenizer, record: dict[str, Any], fmt: str, mask_prompt: bool, where: str):
    if fmt == "chat":
        messages = _check_messages(record.get("messages"), where)
        if mask_prompt and not any(m.get("role") == "assistant" for m in messages):
            raise TrainingError(f"{where}: no assistant message to learn from "
                                "(add one, or pass --no-mask-prompt to train on the whole conversation)")
        return encode_chat(tokenizer, messages, mask_prompt, record.get("tools"))
    if fmt == "completions":
        prompt = _check_str(record.get("prompt"), "prompt", where)
        completion = _check_str(record.get("completion"), "completion", where)
        return encode_completion(tokenizer, prompt, completion, mask_prompt)
    return encode_text(tokenizer, _check_str(record.get("text"), "text", where))


def load_dataset(path: str | Path, tokenizer, mask_prompt: bool = True, max_seq_length: int = 2048) -> Dataset:
    """Reads and tokenizes one JSONL file; longer examples are cut to max_seq_length (counted)."""
    path = Path(path)
    records = read_jsonl(path)
    if not records:
        raise TrainingError(f"{path} holds no examples")
    fmt = detect_format(records[0][1], f"{path}:{records[0][0]}")
    ds = Dataset(path=path, format=fmt, examples=[], records=len(records))
    for lineno, record in records:
        where = f"{path}:{lineno}"
        if detect_format(record, where) != fmt:
            raise TrainingError(f"{where}: this record is {detect_format(record, where)} but the file's first "
                                f"record is {fmt}; one file holds one format")
        ids, mask = encode_record(tokenizer, record, fmt, mask_prompt, where)
        if len(ids) < 2:
            raise TrainingError(f"{where}: the example is a single token; nothing to learn")
        ds.longest = max(ds.longest, len(ids))
        if len(ids) > max_seq_length:
            ds.truncated += 1
            ids, mask = ids[:max_seq_length], mask[:max_seq_length]
            if not mask[1:].any():
                ds.skipped += 1
                continue
        ds.examples.append(Example(np.asarray(ids, np.int32), np.asarray(mask, bool)))
    if not ds.examples:
        raise TrainingError(f"{path}: no example keeps any token to learn from within max-seq-length {max_seq_length}")
    return ds


def split_path(data_dir: str | Path, split: str) -> Path:
    if data_dir is None:
        raise TrainingError("no training data given (--data DIR with train.jsonl and valid.jsonl)")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise TrainingError(f"data folder not found: {data_dir}")
    path = data_dir / f"{split}.jsonl"
    if not path.is_file():
        raise TrainingError(f"{split}.jsonl not found in {data_dir} (a data folder holds train.jsonl, valid.jsonl "
                            "and, for --test, test.jsonl)")
    return path


def load_split(data_dir, split: str, tokenizer, mask_prompt: bool = True, max_seq_length: int = 2048) -> Dataset:
    return load_dataset(split_path(data_dir, split), tokenizer, mask_prompt, max_seq_length)


# -- batches ------------------------------------------------------------------------------------


def batch_plan(dataset: Dataset, batch_size: int) -> list[list[int]]:
    """Example indices per batch: sorted by length so a batch pads little (the last may be short)."""
    order = sorted(range(len(dataset)), key=lambda i: (len(dataset.examples[i]), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass
class BatchStream:
    """The k-th training micro-batch for any k, the same for the same seed: resuming replays it."""

    dataset: Dataset
    batch_size: int
    seed: int
    rank: int = 0  # data parallel: this rank trains on every `ranks`-th example of each batch
    ranks: int = 1
    plan: list[list[int]] = field(init=False)
    _epoch: int = field(default=-1, init=False)
    _order: np.ndarray | None = field(default=None, init=False)

    def __post_init__(self):
        if self.batch_size % self.ranks:
            raise InputError(f"--batch-size {self.batch_size} does not split over {self.ranks} ranks "
                             f"(data parallel: use a multiple of {self.ranks})")
        self.plan = batch_plan(self.dataset, self.batch_size)
        if self.ranks > 1 and len(self.plan) > 1 and len(self.plan[-1]) < self.ranks:
            self.plan[-2] += self.plan.pop()  # every rank needs an example of every batch
        if self.ranks > 1 and len(self.plan[0]) < self.ranks:
            raise InputError(f"{len(self.dataset)} training examples cannot be split over {self.ranks} ranks")

    def __len__(self) -> int:
        return len(self.plan)

    def indices(self, k: int) -> list[int]:
        epoch, i = divmod(k, len(self.plan))
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.plan))
            self._epoch = epoch
        return self.plan[int(self._order[i])]

    def __getitem__(self, k: int) -> Batch:
        return collate([self.dataset.examples[j] for j in self.indices(k)[self.rank :: self.ranks]])


class Batch(NamedTuple):
    inputs: np.ndarray  # (B, T) int32
    targets: np.ndarray  # (B, T) int32
    weights: np.ndarray  # (B, T) float32: 1 where the target counts in the loss
    n_tokens: int  # real (unpadded) tokens in the batch
    positions: np.ndarray  # (K,) int32: flat indices into (B * T) of the targets in the loss, padded
    position_weights: np.ndarray  # (K,) float32: 1 for a real position, 0 for padding


def collate(examples: list[Example], pad_id: int = 0) -> Batch:
    """Pads to T = a multiple of PAD_MULTIPLE (fewer distinct shapes); inputs and targets are shifted by one.

    `positions` lists where the loss looks, so logits can be computed there only (with a masked
    prompt most positions need none); its length is padded to a multiple of PAD_MULTIPLE too.
    """
    longest = max(len(e) for e in examples)
    width = -(-(longest - 1) // PAD_MULTIPLE) * PAD_MULTIPLE + 1
    tokens = np.full((len(examples), width), pad_id, np.int32)
    weights = np.zeros((len(examples), width), np.float32)
    for b, e in enumerate(examples):
        tokens[b, : len(e)] = e.tokens
        weights[b, : len(e)] = e.mask
    weights = weights[:, 1:]
    flat = np.flatnonzero(weights.reshape(-1)).astype(np.int32)
    k = min(-(-len(flat) // PAD_MULTIPLE) * PAD_MULTIPLE, weights.size)
    positions = np.zeros(k, np.int32)
    positions[: len(flat)] = flat
    position_weights = np.zeros(k, np.float32)
    position_weights[: len(flat)] = 1.0
    return Batch(tokens[:, :-1], tokens[:, 1:], weights, sum(len(e) for e in examples), positions, position_weights)


def eval_batches(dataset: Dataset, batch_size: int, max_batches: int = -1):
    """Batches in a fixed order for validation / test (all of them for max_batches=-1)."""
    plan = batch_plan(dataset, batch_size)
    if max_batches != -1:
        rng = np.random.default_rng(0)
        plan = [plan[i] for i in sorted(rng.permutation(len(plan))[:max_batches])]
    for idx in plan:
        yield collate([dataset.examples[j] for j in idx])
