"""A compiled decode step: the whole one-token forward pass as one mx.compile'd graph.

The graph must have fixed shapes, so the KV cache is preallocated (B, Hkv, capacity, Dh) and written
at a position given as an array (mx.slice_update), RoPE takes that position as an array too, and
attention reads the whole buffer under a mask (positions <= offset); on CPU the rotary cos/sin rows
come in as inputs from the model's backend (models.backend). One graph is traced per
(batch, capacity); capacity is a multiple of CAPACITY_STEP, so a process traces few graphs.

Where it pays: on a GPU, batch-1 decode of small models is bound by per-operation host work
(building the graph in Python, launching kernels); compiling removes the first and fuses the
elementwise kernels. On the CPU backend, decode is bound by reading the weights and MLX compiles
kernels with the system C++ compiler at run time (seconds), so it is off there by default
(device.compiled_step_default).
"""

from __future__ import annotations

import mlx.core as mx

from .models.llama import Model

CAPACITY_STEP = 512


class StaticKVCache:
    """A KV cache of fixed capacity for tracing: `offset` is an int32 array scalar."""

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array):
        self.keys, self.values, self.offset = keys, values, offset  # (B, Hkv, capacity, Dh)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys = mx.slice_update(self.keys, keys, self.offset[None], axes=(2,))
        self.values = mx.slice_update(self.values, values, self.offset[None], axes=(2,))
        return self.keys, self.values


def supports_compiled_step(model) -> bool:
    return isinstance(model, Model)


def make_step(model: Model):
    """(tokens (B, 1), offset () int32, keys [(B, Hkv, C, Dh)], values [...], rope_rows [] or
    [cos, sin]) -> (logits (B, V), keys, values). rope_rows: the backend's rotary rows for this
    position, computed on the host (CPU); empty: mx.fast.rope with the array offset (GPU)."""

    def step(tokens, offset, keys, values, rope_rows):
        caches = [StaticKVCache(k, v, offset) for k, v in zip(keys, values)]
        capacity = keys[0].shape[2]
        mask = (mx.arange(capacity) <= offset)[None, None, None, :]  # (1, 1, 1, C)
        logits = model(tokens, cache=caches, mask=mask, rope_rows=tuple(rope_rows) or None)[:, -1, :]
        return logits, [c.keys for c in caches], [c.values for c in caches]

    return mx.compile(step, inputs=model.state)


def compiled_step_for(model: Model):
    """One compiled function per model object (kept on the object, not in a global)."""
    step = model.__dict__.get("_mlxllama_compiled_step")
    if step is None:
        step = make_step(model)
        object.__setattr__(model, "_mlxllama_compiled_step", step)
    return step


def round_up(n: int, step: int | None = None) -> int:
    step = step or CAPACITY_STEP
    return max(step, (n + step - 1) // step * step)


def pad_positions(a: mx.array, extra: int) -> mx.array:
    """(B, H, S, D) -> (B, H, S + extra, D) with zeros after."""
    return mx.concatenate([a, mx.zeros((*a.shape[:2], extra, a.shape[3]), a.dtype)], axis=2)


class CompiledForward:
    """`logits = forward(y (B,))` for one new token per sequence, continuing from a filled KVCache
    (its state is copied into preallocated buffers; the KVCache itself is not updated after)."""

    def __init__(self, model: Model, cache: list):
        self.step = compiled_step_for(model)
        self.offset = cache[0].offset
        self.rope_rows = model.model.rope_rows  # host-computed rotary rows on CPU, None elsewhere
        capacity = round_up(self.offset + 1)  # multiples of CAPACITY_STEP: few distinct graphs
        self.keys = [pad_positions(c.state[0], capacity - self.offset) for c in cache]
        self.values = [pad_positions(c.state[1], capacity - self.offset) for c in cache]

    def __call__(self, y: mx.array) -> mx.array:
        if self.offset >= self.keys[0].shape[2]:
            self.keys = [pad_positions(k, CAPACITY_STEP) for k in self.keys]
            self.values = [pad_positions(v, CAPACITY_STEP) for v in self.values]
        offset = mx.array(self.offset, dtype=mx.int32)
        rows = list(self.rope_rows(self.offset, 1, self.keys[0].dtype) or [])
        logits, self.keys, self.values = self.step(y[:, None], offset, self.keys, self.values, rows)
        self.offset += 1
        return logits  # (B, V)
