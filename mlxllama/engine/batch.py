"""Decoding several sequences at once, with sequences joining and leaving between steps.

`PaddedBatch` keeps every sequence in one (B, Hkv, S, Dh) cache per layer, left-padded to a common
length S. Each row has its own RoPE position (`BatchKVCache.offset`, shape (B,)), so a sequence
computes what it would alone; padding is masked out of attention. One model call advances all
rows by one token. New prompts are read together the same way (`PaddedPrefill`: several prompts,
left-padded, in chunks of columns; the last column gives every prompt's next-token logits) and
then joined to the batch. A prompt whose beginning is already computed (a prefix-cache hit) is
read alone, starting from that KV state.

With kv_bits the keys and values are stored quantized (mx.quantize, (packed, scales, biases)
triples) once a cache holds `quantized_kv_start` positions; attention then reads them with
mx.quantized_matmul. Zero padding quantizes to zero scales and biases, and is masked anyway.

`SeparateRows` is the fallback for models that take no attention mask (mlx-lm's zoo): one cache
per sequence, one model call per sequence and step, prompts read one after another.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..models import Model, make_cache
from ..models.cache import KVCache, QuantizedKVCache, maybe_quantize, quantize_kv


def padding_mask(pad: mx.array, offset: int, L: int) -> mx.array:
    """(B, 1, L, offset+L) bool: causal, not on padding; each position may always see itself
    (so fully padded rows stay finite)."""
    q = mx.arange(offset, offset + L)[:, None]  # (L, 1)
    k = mx.arange(offset + L)[None]  # (1, S)
    allowed = (q >= k)[None] & (k[None] >= pad[:, None, None])  # (B, L, S)
    allowed = allowed | (q == k)[None]
    return allowed[:, None]


@dataclass
class KVQuant:
    """How the engine stores keys and values: float (bits None) or quantized from `start` positions on."""

    bits: int | None = None
    group_size: int = 64
    start: int = 0


def _map(x, f):
    """f over an array or over each array of a (packed, scales, biases) triple."""
    return tuple(f(a) for a in x) if isinstance(x, tuple) else f(x)


def _zeros_like_rows(x, B: int, S: int):
    return _map(x, lambda a: mx.zeros((B, a.shape[1], S, a.shape[3]), a.dtype))


def _concat(parts: list, axis: int):
    if isinstance(parts[0], tuple):
        return tuple(mx.concatenate([p[i] for p in parts], axis=axis) for i in range(len(parts[0])))
    return mx.concatenate(parts, axis=axis)


class BatchKVCache:
    """One layer's keys and values for B left-padded rows; row b is valid in [pad[b], length).
    keys/values: arrays (B, Hkv, capacity, Dh), or (packed, scales, biases) triples when quantized."""

    step = 256

    def __init__(self, keys, values, pad: list[int], quant: KVQuant | None = None, length: int | None = None):
        self.keys, self.values = keys, values
        first = keys[0] if isinstance(keys, tuple) else keys
        self.length = first.shape[2] if length is None else length
        self.pad_list = list(pad)
        self.pad = mx.array(self.pad_list, dtype=mx.int32)  # (B,)
        self.offset = self.length - self.pad  # (B,) each row's own position, for RoPE
        self.quant = quant or KVQuant()
        if isinstance(keys, tuple):
            self.bits, self.group_size = self.quant.bits, self.quant.group_size  # attention reads these

    @property
    def quantized(self) -> bool:
        return isinstance(self.keys, tuple)

    @property
    def state(self):
        return _map(self.keys, lambda a: a[..., : self.length, :]), _map(self.values, lambda a: a[..., : self.length, :])

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        L = keys.shape[2]
        end = self.length + L
        if self.quantized:
            keys = quantize_kv(keys, self.group_size, self.bits)
            values = quantize_kv(values, self.group_size, self.bits)
        capacity = (self.keys[0] if self.quantized else self.keys).shape[2]
        if end > capacity:
            grow = ((L + self.step - 1) // self.step) * self.step
            B = (keys[0] if self.quantized else keys).shape[0]
            k_old, v_old = self.state
            self.keys = _concat([k_old, _zeros_like_rows(keys, B, grow)], axis=2)
            self.values = _concat([v_old, _zeros_like_rows(values, B, grow)], axis=2)
        if self.quantized:
            for i in range(3):
                self.keys[i][..., self.length : end, :] = keys[i]
                self.values[i][..., self.length : end, :] = values[i]
        else:
            self.keys[..., self.length : end, :] = keys
            self.values[..., self.length : end, :] = values
        self.length = end
        self.offset = self.offset + L
        return self.state

    def quantize(self) -> "BatchKVCache":
        """This layer with its keys and values quantized (itself when already quantized)."""
        if self.quantized or self.quant.bits is None:
            return self
        k, v = self.state
        q = lambda a: quantize_kv(a, self.quant.group_size, self.quant.bits)  # noqa: E731
        return BatchKVCache(q(k), q(v), self.pad_list, self.quant)

    def maybe_quantize(self) -> "BatchKVCache":
        if self.quant.bits is not None and not self.quantized and self.length >= max(self.quant.start, 1):
            return self.quantize()
        return self

    def row(self, b: int):
        """Row b's valid positions as a single-sequence state: (k, v), each (1, Hkv, S_b, .)."""
        start = self.pad_list[b]
        k, v = self.state
        return _map(k, lambda a: a[b : b + 1, :, start:, :]), _map(v, lambda a: a[b : b + 1, :, start:, :])


def _left_pad(x, n: int):
    """(B, H, S, D) -> (B, H, n + S, D) with zeros in front (each part of a quantized triple)."""
    if n == 0:
        return x
    return _map(x, lambda a: mx.concatenate([mx.zeros((a.shape[0], a.shape[1], n, a.shape[3]), a.dtype), a], axis=2))


def layer_states(caches: list) -> list:
    """Per-layer (k, v) of single-sequence caches (KVCache or QuantizedKVCache)."""
    return [c.state for c in caches]


class PaddedBatch:
    """All active sequences in one left-padded cache; one model call per step."""

    def __init__(self, model, quant: KVQuant | None = None):
        self.model = model
        self.quant = quant or KVQuant()
        args = model.args
        # a rank of a tensor-parallel model holds only its share of the KV heads
        heads = getattr(model.layers[0].self_attn, "n_kv_heads", args.num_key_value_heads) if model.layers else \
            args.num_key_value_heads
        self.kv_shape = (heads, args.head_dim)  # (Hkv, Dh)
        self.dtype = model.model.norm.weight.dtype  # the compute dtype
        self.layers = self.empty_layers([])

    def empty_layers(self, pad: list[int]) -> list[BatchKVCache]:
        zeros = mx.zeros((len(pad), self.kv_shape[0], 0, self.kv_shape[1]), self.dtype)  # (B, Hkv, 0, Dh)
        return [BatchKVCache(zeros, zeros, pad, self.quant) for _ in self.model.layers]

    def layers_from(self, states: list) -> list[BatchKVCache]:
        """One row's cache layers from per-layer (k, v) states (a prefix-cache hit)."""
        return [BatchKVCache(k, v, [0], self.quant) for k, v in states]

    @property
    def size(self) -> int:
        return len(self.layers[0].pad_list)

    def prefill(self, prompts: list[list[int]], start: list | None = None) -> "PaddedPrefill":
        return PaddedPrefill(self, prompts, start)

    def add(self, group: "PaddedPrefill") -> None:
        """Appends the rows of a finished prefill after the current rows."""
        if self.size == 0:
            self.layers = group.layers
            return
        S, n = self.layers[0].length, group.layers[0].length
        T = max(S, n)
        pad = [p + T - S for p in self.layers[0].pad_list] + [p + T - n for p in group.layers[0].pad_list]
        for i, (old, new) in enumerate(zip(self.layers, group.layers)):
            if old.quantized != new.quantized:  # one kind per batch: quantize the float one
                old, new = old.quantize(), new.quantize()
            (old_k, old_v), (new_k, new_v) = old.state, new.state
            keys = _concat([_left_pad(old_k, T - S), _left_pad(new_k, T - n)], axis=0)  # (B + k, Hkv, T, Dh)
            values = _concat([_left_pad(old_v, T - S), _left_pad(new_v, T - n)], axis=0)
            self.layers[i] = BatchKVCache(keys, values, pad, self.quant)

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
            pick = lambda a: a[index, :, cut:, :]  # noqa: E731
            self.layers[i] = BatchKVCache(_map(k, pick), _map(v, pick), [p - cut for p in pad], self.quant)

    def step(self, tokens: mx.array) -> mx.array:
        """tokens (B,) -> logits (B, V) for the next position of every row."""
        layer = self.layers[0]
        if layer.pad_list == [0] and not layer.quantized:
            return self._step_one(tokens)
        mask = padding_mask(layer.pad, layer.length, 1) if any(layer.pad_list) else None  # (B, 1, 1, S+1)
        logits = self.model(tokens[:, None], cache=self.layers, mask=mask)[:, -1, :]
        self.layers = [c.maybe_quantize() for c in self.layers]
        return logits

    def _step_one(self, tokens: mx.array) -> mx.array:
        """One unpadded row: the same step through plain KVCaches over the same buffers, the form the
        model's fastest decode takes (the CPU's fused blocks, models.backend). The layers let go of
        their buffers meanwhile, so the model can write them in place."""
        caches = []
        for layer in self.layers:
            c = KVCache()
            c.keys, c.values, c.offset = layer.keys, layer.values, layer.length
            layer.keys = layer.values = None
            caches.append(c)
        try:
            logits = self.model(tokens[:, None], cache=caches)[:, -1, :]
        finally:
            for layer, c in zip(self.layers, caches):
                if c.keys is not None:
                    layer.keys, layer.values = c.keys, c.values
                    layer.offset = layer.offset + (c.offset - layer.length)
                    layer.length = c.offset
        self.layers = [c.maybe_quantize() for c in self.layers]
        return logits

    def state(self) -> list:
        return [layer.state for layer in self.layers]

    def row_state(self, b: int) -> list:
        """Row b's per-layer (k, v) states, as a single sequence would hold them."""
        return [layer.row(b) for layer in self.layers]


class PaddedPrefill:
    """Several prompts read into one left-padded cache, a chunk of columns per call. RoPE offsets
    start at -pad, so every prompt's first real token sits at position 0, as it would alone.
    `start`: per-layer (k, v) of positions already computed (one prompt only); reading goes on
    from there."""

    def __init__(self, batch: PaddedBatch, prompts: list[list[int]], start: list | None = None):
        self.model = batch.model
        L = max(map(len, prompts))
        pad = [L - len(p) for p in prompts]
        self.tokens = mx.array([[0] * n + p for n, p in zip(pad, prompts)], dtype=mx.int32)  # (k, L)
        if start is not None:
            assert len(prompts) == 1, "a prompt with a cached prefix is read alone"
            self.layers = batch.layers_from(start)
        else:
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
        offset = self.layers[0].length
        mask = padding_mask(self.layers[0].pad, offset, cols)  # (k, 1, cols, offset + cols)
        self.read += cols
        out = self.model(chunk, cache=self.layers, mask=mask)  # (k, cols, V)
        self.layers = [c.maybe_quantize() for c in self.layers]
        return out


class SeparateRows:
    """One cache per sequence; one model call per sequence and step."""

    def __init__(self, model, quant: KVQuant | None = None):
        self.model = model
        self.quant = quant or KVQuant()
        self.caches: list[list] = []

    @property
    def size(self) -> int:
        return len(self.caches)

    def prefill(self, prompts: list[list[int]], start: list | None = None) -> "SeparatePrefill":
        return SeparatePrefill(self, prompts, start)

    def add(self, group: "SeparatePrefill") -> None:
        self.caches.extend(group.caches)

    def keep(self, rows: list[int]) -> None:
        self.caches = [self.caches[r] for r in rows]

    def step(self, tokens: mx.array) -> mx.array:
        logits = []
        for i, c in enumerate(self.caches):
            logits.append(self.model(tokens[i : i + 1][None], cache=c)[:, -1, :])
            maybe_quantize(c, self.quant.bits, self.quant.group_size, self.quant.start)
        return mx.concatenate(logits, axis=0)  # (B, V)

    def state(self) -> list:
        return [[c.state for c in caches] for caches in self.caches]

    def row_state(self, b: int) -> list:
        return layer_states(self.caches[b])


def caches_from_states(model, states: list | None, quant: KVQuant | None = None) -> list:
    """A fresh single-sequence cache list (KVCache, or QuantizedKVCache for quantized states) holding
    these per-layer (k, v) states; `quant` says how quantized states were made."""
    if states is None:
        return make_cache(model)
    quant = quant or KVQuant()
    caches = []
    for k, v in states:
        c = QuantizedKVCache(quant.group_size, quant.bits) if isinstance(k, tuple) else KVCache()
        c.state = (k, v)
        caches.append(c)
    return caches


class SeparatePrefill:
    """Prompts read one after another, each into its own cache."""

    def __init__(self, rows: SeparateRows, prompts: list[list[int]], start: list | None = None):
        self.model, self.quant = rows.model, rows.quant
        self.prompts = [list(p) for p in prompts]
        self.caches = [caches_from_states(self.model, start, self.quant) if start is not None and i == 0
                       else make_cache(self.model) for i in range(len(prompts))]
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
                maybe_quantize(cache, self.quant.bits, self.quant.group_size, self.quant.start)
            if ends:
                self.last.append(self.model(mx.array(chunk[-1:], dtype=mx.int32)[None], cache=cache)[:, -1, :])
                maybe_quantize(cache, self.quant.bits, self.quant.group_size, self.quant.start)
            self.read += len(chunk)
            budget -= len(chunk)
            mx.eval([c.state for c in cache], self.last[-1:] if ends else [])

    @property
    def logits(self) -> mx.array:
        return mx.concatenate(self.last, axis=0)  # (k, V)


def make_batch(model, quant: KVQuant | None = None):
    """The padded batch for our Llama-family model; one call per sequence for others."""
    return PaddedBatch(model, quant) if isinstance(model, Model) else SeparateRows(model, quant)
