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
