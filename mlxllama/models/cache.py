"""KV caches behind one interface: update_and_fetch(keys, values), offset, trim(n), state.

Keys and values are (B, Hkv, S, Dh). Buffers grow in chunks of `step` positions and are written in
place, so decoding never concatenates per token.
"""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    step = 256

    def __init__(self):
        self.keys: mx.array | None = None  # (B, Hkv, capacity, Dh)
        self.values: mx.array | None = None
        self.offset = 0

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        B, H, _, Dk = keys.shape
        Dv = values.shape[3]
        n_steps = (needed + self.step - 1) // self.step
        new_k = mx.zeros((B, H, n_steps * self.step, Dk), keys.dtype)
        new_v = mx.zeros((B, H, n_steps * self.step, Dv), values.dtype)
        if self.keys is not None:
            new_k = mx.concatenate([self.keys[..., : self.offset, :], new_k], axis=2)
            new_v = mx.concatenate([self.values[..., : self.offset, :], new_v], axis=2)
        self.keys, self.values = new_k, new_v

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        L = keys.shape[2]
        end = self.offset + L
        if self.keys is None or end > self.keys.shape[2]:
            self._grow(keys, values, end - self.offset)
        self.keys[..., self.offset : end, :] = keys
        self.values[..., self.offset : end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def trim(self, n: int) -> int:
        """Forgets the last n positions; returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    def is_trimmable(self) -> bool:
        return True

    @property
    def state(self) -> tuple[mx.array, mx.array]:
        if self.keys is None:
            return ()
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @state.setter
    def state(self, kv: tuple[mx.array, mx.array]) -> None:
        self.keys, self.values = kv
        self.offset = self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)

    def copy(self) -> "KVCache":
        other = KVCache()
        if self.keys is not None:
            other.state = tuple(mx.array(a) for a in self.state)
        return other


class RotatingKVCache:
    """Keeps the first `keep` positions (attention sinks) and the most recent max_size - keep.

    Single-token updates write into a ring buffer; multi-token updates (prefill chunks) put the
    buffer back in temporal order and append, so every query sees at least max_size positions.
    """

    step = 256

    def __init__(self, max_size: int, keep: int = 4):
        if max_size <= keep:
            raise ValueError(f"max_kv_size must be larger than {keep}")
        self.max_size, self.keep = max_size, keep
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0  # tokens seen
        self._idx = 0  # next write position in the buffer

    def _temporal(self, v: mx.array) -> mx.array:
        if self._idx >= v.shape[2] or self.offset <= v.shape[2]:
            return v[..., : min(self.offset, v.shape[2]), :]
        k = self.keep
        return mx.concatenate([v[..., :k, :], v[..., self._idx :, :], v[..., k : self._idx, :]], axis=2)

    def _trim_front(self, v: mx.array, extra: int) -> mx.array:
        """Drops `extra` positions just after the kept sinks."""
        if extra <= 0:
            return v
        return mx.concatenate([v[..., : self.keep, :], v[..., self.keep + extra :, :]], axis=2)

    def _update_concat(self, keys: mx.array, values: mx.array):
        if self.keys is None:
            k, v = keys, values
        else:
            k_old, v_old = self._temporal(self.keys), self._temporal(self.values)
            drop = k_old.shape[2] - self.max_size + 1
            k = mx.concatenate([self._trim_front(k_old, drop), keys], axis=2)
            v = mx.concatenate([self._trim_front(v_old, drop), values], axis=2)
        self.offset += keys.shape[2]
        self.keys, self.values = k, v
        self._idx = k.shape[2]
        return k, v

    def _update_in_place(self, keys: mx.array, values: mx.array):
        B, H, _, Dk = keys.shape
        if self.keys is not None and self.keys.shape[2] > self.max_size:  # after a long prefill chunk
            self.keys = self._trim_front(self._temporal(self.keys), self.keys.shape[2] - self.max_size)
            self.values = self._trim_front(self._temporal(self.values), self.values.shape[2] - self.max_size)
            self._idx = self.max_size
        size = 0 if self.keys is None else self.keys.shape[2]
        if self._idx >= size and size < self.max_size:  # still growing
            grow = min(self.step, self.max_size - size)
            new_k = mx.zeros((B, H, grow, Dk), keys.dtype)
            new_v = mx.zeros((B, H, grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., : self._idx, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., : self._idx, :], new_v], axis=2)
        if self._idx >= self.max_size:
            self._idx = self.keep
        self.keys[..., self._idx : self._idx + 1, :] = keys
        self.values[..., self._idx : self._idx + 1, :] = values
        self.offset += 1
        self._idx += 1
        n = min(self.offset, self.keys.shape[2])
        return self.keys[..., :n, :], self.values[..., :n, :]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if keys.shape[2] == 1:
            return self._update_in_place(keys, values)
        return self._update_concat(keys, values)

    def make_mask(self, L: int):
        return "causal" if L > 1 else None

    def is_trimmable(self) -> bool:
        return self.offset < self.max_size

    def trim(self, n: int) -> int:
        if not self.is_trimmable():
            return 0
        n = min(self.offset, n)
        self.offset -= n
        self._idx -= n
        return n

    @property
    def state(self):
        if self.keys is None:
            return ()
        return self._temporal(self.keys), self._temporal(self.values)

    @state.setter
    def state(self, kv) -> None:
        self.keys, self.values = kv
        self.offset = self._idx = self.keys.shape[2]


KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)


def check_kv_quantization(bits: int | None, group_size: int = 64, head_dim: int | None = None) -> None:
    """Raises ValueError naming the allowed values (the CLI turns it into one line)."""
    if bits is None:
        return
    if bits not in KV_BITS:
        raise ValueError(f"kv bits must be one of {', '.join(map(str, KV_BITS))}, got {bits}")
    if group_size not in KV_GROUP_SIZES:
        raise ValueError(f"kv group size must be one of {', '.join(map(str, KV_GROUP_SIZES))}, got {group_size}")
    if head_dim is not None and head_dim % group_size:
        raise ValueError(f"kv group size {group_size} does not divide the model's head dimension {head_dim}")


def quantize_kv(x: mx.array, group_size: int, bits: int) -> tuple[mx.array, mx.array, mx.array]:
    """(B, H, S, D) -> (packed (B, H, S, D*bits/32) uint32, scales (B, H, S, D/g), biases (B, H, S, D/g))."""
    return tuple(mx.quantize(x, group_size=group_size, bits=bits))


class QuantizedKVCache:
    """Keys and values stored as MLX affine quantization (mx.quantize along the head dimension);
    attention reads them with mx.quantized_matmul (models.base.quantized_attention). About
    bits/8 + 2 * itemsize / group_size bytes per value (scales and biases in the compute dtype):
    of a float32 cache 0.16x at 4 bits and 0.28x at 8 (group 64); of a float16 one 0.28x and 0.53x.
    The state is mlx-lm's: (keys, values) as (packed, scales, biases) triples."""

    step = 256

    def __init__(self, group_size: int = 64, bits: int = 8):
        self.keys: tuple | None = None
        self.values: tuple | None = None
        self.offset = 0
        self.group_size, self.bits = group_size, bits

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        B, H = keys.shape[:2]
        n = (needed + self.step - 1) // self.step * self.step
        per_int = 32 // self.bits

        def empty(dim, dtype):
            return (mx.zeros((B, H, n, dim // per_int), mx.uint32), mx.zeros((B, H, n, dim // self.group_size), dtype),
                    mx.zeros((B, H, n, dim // self.group_size), dtype))

        new_k, new_v = empty(keys.shape[3], keys.dtype), empty(values.shape[3], values.dtype)
        if self.keys is not None:
            new_k = tuple(mx.concatenate([a[..., : self.offset, :], b], axis=2) for a, b in zip(self.keys, new_k))
            new_v = tuple(mx.concatenate([a[..., : self.offset, :], b], axis=2) for a, b in zip(self.values, new_v))
        self.keys, self.values = new_k, new_v

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        L = keys.shape[2]
        end = self.offset + L
        if self.keys is None or end > self.keys[0].shape[2]:
            self._grow(keys, values, end - self.offset)
        qk = quantize_kv(keys, self.group_size, self.bits)
        qv = quantize_kv(values, self.group_size, self.bits)
        for i in range(3):
            self.keys[i][..., self.offset : end, :] = qk[i]
            self.values[i][..., self.offset : end, :] = qv[i]
        self.offset = end
        return tuple(a[..., :end, :] for a in self.keys), tuple(a[..., :end, :] for a in self.values)

    trim = KVCache.trim
    is_trimmable = KVCache.is_trimmable

    @property
    def state(self):
        if self.keys is None:
            return ()
        return (tuple(a[..., : self.offset, :] for a in self.keys), tuple(a[..., : self.offset, :] for a in self.values))

    @state.setter
    def state(self, kv) -> None:
        self.keys, self.values = tuple(kv[0]), tuple(kv[1])
        self.offset = self.keys[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state[0] + self.state[1]) if self.keys is not None else 0


def to_quantized(cache: KVCache, group_size: int, bits: int) -> QuantizedKVCache:
    q = QuantizedKVCache(group_size, bits)
    if cache.keys is not None:
        k, v = cache.state
        q.state = (quantize_kv(k, group_size, bits), quantize_kv(v, group_size, bits))
    return q


def maybe_quantize(caches: list, bits: int | None, group_size: int = 64, start: int = 0) -> None:
    """Replaces float KVCaches by quantized ones, in place, once they hold at least `start`
    positions (mlx-lm's quantized_kv_start)."""
    if bits is None:
        return
    for i, c in enumerate(caches):
        if type(c) is KVCache and c.offset >= start and c.offset > 0:
            caches[i] = to_quantized(c, group_size, bits)
