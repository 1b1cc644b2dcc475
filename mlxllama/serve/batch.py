"""Decoding several sequences at once, with sequences joining and leaving between steps.

`PaddedBatch` keeps every sequence in one (B, Hkv, S, Dh) cache per layer, left-padded to a common
length S. Each row has its own RoPE position (`BatchKVCache.offset`, shape (B,)), so a sequence
computes what it would alone; padding is masked out of attention. One model call advances all
rows by one token. New prompts are read together the same way (`PaddedPrefill`: several prompts,
left-padded, in chunks of columns; the last column gives every prompt's next-token logits) and
then joined to the batch.

`SeparateRows` is the fallback for models that take no attention mask (mlx-lm's zoo): one cache
per sequence, one model call per sequence and step, prompts read one after another.
"""

from __future__ import annotations

import mlx.core as mx

from ..generate import padding_mask
from ..models import Model, make_cache


class BatchKVCache:
    """One layer's keys and values for B left-padded rows; row b is valid in [pad[b], length)."""

    step = 256

    def __init__(self, keys: mx.array, values: mx.array, pad: list[int]):
        self.keys, self.values = keys, values  # (B, Hkv, capacity, Dh)
        self.length = keys.shape[2]
        self.pad_list = list(pad)
        self.pad = mx.array(self.pad_list, dtype=mx.int32)  # (B,)
        self.offset = self.length - self.pad  # (B,) each row's own position, for RoPE

    @property
    def state(self) -> tuple[mx.array, mx.array]:
        return self.keys[..., : self.length, :], self.values[..., : self.length, :]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        L = keys.shape[2]
        end = self.length + L
        if end > self.keys.shape[2]:
            B, H, _, Dk = keys.shape
            grow = ((L + self.step - 1) // self.step) * self.step
            self.keys = mx.concatenate([self.keys[..., : self.length, :], mx.zeros((B, H, grow, Dk), keys.dtype)], axis=2)
            self.values = mx.concatenate(
                [self.values[..., : self.length, :], mx.zeros((B, H, grow, values.shape[3]), values.dtype)], axis=2)
        self.keys[..., self.length : end, :] = keys
        self.values[..., self.length : end, :] = values
        self.length = end
        self.offset = self.offset + L
        return self.keys[..., :end, :], self.values[..., :end, :]


def _left_pad(x: mx.array, n: int) -> mx.array:
    """(B, H, S, D) -> (B, H, n + S, D) with zeros in front."""
    if n == 0:
        return x
    B, H, _, D = x.shape
    return mx.concatenate([mx.zeros((B, H, n, D), x.dtype), x], axis=2)


class PaddedBatch:
    """All active sequences in one left-padded cache; one model call per step."""

    def __init__(self, model):
        self.model = model
        args = model.args
        self.kv_shape = (args.num_key_value_heads, args.head_dim)  # (Hkv, Dh)
        self.dtype = model.model.norm.weight.dtype  # the compute dtype
        self.layers = self.empty_layers([])

    def empty_layers(self, pad: list[int]) -> list[BatchKVCache]:
        zeros = mx.zeros((len(pad), self.kv_shape[0], 0, self.kv_shape[1]), self.dtype)  # (B, Hkv, 0, Dh)
        return [BatchKVCache(zeros, zeros, pad) for _ in self.model.layers]

    @property
    def size(self) -> int:
        return len(self.layers[0].pad_list)

    def prefill(self, prompts: list[list[int]]) -> "PaddedPrefill":
        return PaddedPrefill(self, prompts)

    def add(self, group: "PaddedPrefill") -> None:
        """Appends the rows of a finished prefill after the current rows."""
        S, n = self.layers[0].length, group.layers[0].length
        T = max(S, n)
        pad = [p + T - S for p in self.layers[0].pad_list] + [p + T - n for p in group.layers[0].pad_list]
        for i, (old, new) in enumerate(zip(self.layers, group.layers)):
            (old_k, old_v), (new_k, new_v) = old.state, new.state
            keys = mx.concatenate([_left_pad(old_k, T - S), _left_pad(new_k, T - n)], axis=0)  # (B + k, Hkv, T, Dh)
            values = mx.concatenate([_left_pad(old_v, T - S), _left_pad(new_v, T - n)], axis=0)
            self.layers[i] = BatchKVCache(keys, values, pad)

    def keep(self, rows: list[int]) -> None:
        """Keeps only these rows (in this order) and drops the padding they all have."""
        if not rows:
            self.layers = self.empty_layers([])
            return
        pad = [self.layers[0].pad_list[r] for r in rows]
        cut = min(pad)
        index = mx.array(rows, dtype=mx.int32)
        for i, layer in enumerate(self.layers):
            k, v = layer.state
            self.layers[i] = BatchKVCache(k[index, :, cut:, :], v[index, :, cut:, :], [p - cut for p in pad])

    def step(self, tokens: mx.array) -> mx.array:
        """tokens (B,) -> logits (B, V) for the next position of every row."""
        layer = self.layers[0]
        mask = padding_mask(layer.pad, layer.length, 1) if any(layer.pad_list) else None  # (B, 1, 1, S+1)
        return self.model(tokens[:, None], cache=self.layers, mask=mask)[:, -1, :]

    def state(self) -> list:
        return [layer.state for layer in self.layers]


class PaddedPrefill:
    """Several prompts read into one left-padded cache, a chunk of columns per call. RoPE offsets
    start at -pad, so every prompt's first real token sits at position 0, as it would alone."""

    def __init__(self, batch: PaddedBatch, prompts: list[list[int]]):
        self.model = batch.model
        L = max(map(len, prompts))
        pad = [L - len(p) for p in prompts]
        self.tokens = mx.array([[0] * n + p for n, p in zip(pad, prompts)], dtype=mx.int32)  # (k, L)
        self.layers = batch.empty_layers(pad)
        self.read = 0  # columns done
        self.logits: mx.array | None = None  # (k, V) at the last position, once done

    @property
    def done(self) -> bool:
        return self.read >= self.tokens.shape[1]

    def run(self, budget: int) -> None:
        """Reads about `budget` more tokens (padding included), at least one column. The last
        column goes through the model on its own: only its logits are needed."""
        k, L = self.tokens.shape
        cols = min(L - self.read, max(1, budget // max(k, 1)))
        if cols <= 0:
            return
        ends = self.read + cols == L
        body = cols - 1 if ends else cols
        if body:
            self._forward(body)  # logits left unevaluated: never computed
        if ends:
            self.logits = self._forward(1)[:, -1, :]  # left padding: every prompt ends in the last column
        mx.eval([layer.state for layer in self.layers], self.logits if self.done else [])

    def _forward(self, cols: int) -> mx.array:
        chunk = self.tokens[:, self.read : self.read + cols]  # (k, cols)
        mask = padding_mask(self.layers[0].pad, self.read, cols)  # (k, 1, cols, read + cols)
        self.read += cols
        return self.model(chunk, cache=self.layers, mask=mask)  # (k, cols, V)


class SeparateRows:
    """One cache per sequence; one model call per sequence and step."""

    def __init__(self, model):
        self.model = model
        self.caches: list[list] = []

    @property
    def size(self) -> int:
        return len(self.caches)

    def prefill(self, prompts: list[list[int]]) -> "SeparatePrefill":
        return SeparatePrefill(self.model, prompts)

    def add(self, group: "SeparatePrefill") -> None:
        self.caches.extend(group.caches)

    def keep(self, rows: list[int]) -> None:
        self.caches = [self.caches[r] for r in rows]

    def step(self, tokens: mx.array) -> mx.array:
        logits = [self.model(tokens[i : i + 1][None], cache=c)[:, -1, :] for i, c in enumerate(self.caches)]
        return mx.concatenate(logits, axis=0)  # (B, V)

    def state(self) -> list:
        return [[c.state for c in caches] for caches in self.caches]


class SeparatePrefill:
    """Prompts read one after another, each into its own cache."""

    def __init__(self, model, prompts: list[list[int]]):
        self.model = model
        self.prompts = [list(p) for p in prompts]
        self.caches = [make_cache(model) for _ in prompts]
        self.row, self.read = 0, 0
        self.last: list[mx.array] = []  # (1, V) logits at each prompt's last position

    @property
    def done(self) -> bool:
        while self.row < len(self.prompts) and self.read >= len(self.prompts[self.row]):
            self.row, self.read = self.row + 1, 0
        return self.row >= len(self.prompts)

    def run(self, budget: int) -> None:
        while budget > 0 and not self.done:
            prompt, cache = self.prompts[self.row], self.caches[self.row]
            chunk = prompt[self.read : self.read + budget]
            ends = self.read + len(chunk) == len(prompt)
            body = chunk[:-1] if ends else chunk  # the last token alone: only its logits are needed
            if body:
                self.model(mx.array(body, dtype=mx.int32)[None], cache=cache)
            if ends:
                self.last.append(self.model(mx.array(chunk[-1:], dtype=mx.int32)[None], cache=cache)[:, -1, :])
            self.read += len(chunk)
            budget -= len(chunk)
            mx.eval([c.state for c in cache], self.last[-1:] if ends else [])

    @property
    def logits(self) -> mx.array:
        return mx.concatenate(self.last, axis=0)  # (k, V)


def make_batch(model):
    """The padded batch for our Llama-family model; one call per sequence for others."""
    return PaddedBatch(model) if isinstance(model, Model) else SeparateRows(model)
