"""Several processes, one model: tensor and pipeline parallel inference over mx.distributed.

Started by MLX's launcher, every rank runs the same command:

    mlx.launch -n 2 --backend ring -- mlxllama generate --model M -p "..."           # tensor parallel
    mlx.launch --hosts mac1,mac2 -- mlxllama generate --parallel pipeline -p "..."

- tensor: every block's q/k/v and gate/up projections are split by output rows (whole KV-head
  groups per rank), o and down by input columns, with one all_sum after each of the two; quantized
  weights split on group boundaries. Embeddings, norms and the head stay whole on every rank.
- pipeline: the blocks are split into contiguous runs, one per rank; hidden states travel with
  send/recv and each rank keeps the KV cache of its own blocks; the last rank's final hidden states
  reach every rank through one all_sum (then every rank applies the head it holds), evaluated in
  the call itself so that all ranks run the same transfers.

Every rank loads lazily and evaluates only its own slice, so a rank holds about 1/N of the blocks.
Sampling is decided on rank 0 and shared (`shared_sampler`), so every rank feeds the same token;
rank 0 reads input and writes output (`broadcast_text`, `quiet_other_ranks`). A rank that dies
makes the others fail with one line; one that hangs is caught by `Watchdog`.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import mlx.core as mx
import mlx.nn as nn

from .errors import InputError, MlxllamaError

PARALLEL_MODES = ("tensor", "pipeline")


class DistributedError(MlxllamaError):
    """A peer rank was lost or stopped answering."""


def launched() -> bool:
    """True in a process started by mlx.launch (or an MPI launcher) with more than one rank."""
    return any(k in os.environ for k in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"))


def world() -> mx.distributed.Group | None:
    """The group of all ranks when there are several, else None (a plain single-process run)."""
    if not launched():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


# --- splitting the model ---------------------------------------------------------------------

def check_tensor_split(args, n: int) -> None:
    H, Hkv, F = args.num_attention_heads, args.num_key_value_heads, args.intermediate_size
    if Hkv % n or H % n:
        ok = [k for k in range(2, Hkv + 1) if Hkv % k == 0 and H % k == 0]
        raise InputError(
            f"tensor parallel over {n} ranks needs the {Hkv} KV heads (and {H} query heads) to split evenly; "
            f"this model splits over {', '.join(map(str, ok)) or 'no number of'} ranks, or use --parallel pipeline")
    if F % n:
        raise InputError(f"tensor parallel over {n} ranks needs the MLP width {F} to split evenly; use --parallel pipeline")


def _group_size(layer) -> int | None:
    return getattr(layer, "group_size", None) if isinstance(layer, nn.QuantizedLinear) else None


def shard_tensor(model, group) -> None:
    """Splits every block across the ranks of `group` in place (the projections must be unstacked)."""
    from mlx.nn.layers.distributed import shard_linear

    n = group.size()
    check_tensor_split(model.args, n)
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for name, layer_in in (("o_proj", attn.o_proj), ("down_proj", mlp.down_proj)):
            g = _group_size(layer_in)
            cols = layer_in.weight.shape[1] * (32 // layer_in.bits if g else 1)
            if g and (cols // n) % g:
                raise InputError(f"tensor parallel over {n} ranks: layer {i} {name} has {cols} inputs, which do not "
                                 f"split into whole quantization groups of {g}; use --parallel pipeline")
        attn.q_proj = shard_linear(attn.q_proj, "all-to-sharded", group=group)
        attn.k_proj = shard_linear(attn.k_proj, "all-to-sharded", group=group)
        attn.v_proj = shard_linear(attn.v_proj, "all-to-sharded", group=group)
        attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
        attn.n_heads //= n
        attn.n_kv_heads //= n
        mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
        mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
        mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)


def layer_ranges(n_layers: int, n: int) -> list[tuple[int, int]]:
    """Contiguous runs of blocks, one per rank, the first ranks taking the remainder."""
    if n > n_layers:
        raise InputError(f"pipeline parallel over {n} ranks needs at least {n} blocks; the model has {n_layers}")
    base, extra = divmod(n_layers, n)
    out, start = [], 0
    for r in range(n):
        end = start + base + (1 if r < extra else 0)
        out.append((start, end))
        start = end
    return out


def shard_pipeline(model, group) -> None:
    """Keeps only this rank's blocks and makes the forward pass hand hidden states along the ranks."""
    from .models.llama import LlamaModel, Model

    start, end = layer_ranges(len(model.model.layers), group.size())[group.rank()]
    model.model.layers = model.model.layers[start:end]
    model.model.__class__ = type("PipelineLlamaModel", (_PipelineStage, LlamaModel), {})
    model.__class__ = type("PipelineModel", (_PipelineHead, Model), {})
    model.model._group = model._group = group


class _PipelineStage:
    """LlamaModel's forward pass for one run of blocks: receive, run, send."""

    def __call__(self, tokens: mx.array, cache=None, mask=None, rope_rows=None) -> mx.array:
        g = self._group
        r, n = g.rank(), g.size()
        # ranks after the first only take the embeddings' shape and dtype
        h, cache, mask, rope_rows = self.prepare(tokens, cache, mask, rope_rows)
        if r > 0:
            h = mx.distributed.recv_like(h, r - 1, group=g)
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c, rope_rows)
        if r < n - 1:
            return mx.distributed.send(h, r + 1, group=g)  # (B, L, D), only a dependency from here on
        return self.norm(h)


class _PipelineHead:
    """Model's forward pass: the last rank's final hidden states, summed into every rank (D values
    per position, not the V of the logits), then the head, which every rank holds whole."""

    def __call__(self, tokens: mx.array, cache=None, mask=None, rope_rows=None) -> mx.array:
        g = self._group
        h = self.model(tokens, cache, mask, rope_rows)  # (B, L, D): normed on the last rank
        if g.rank() != g.size() - 1:  # zeros that wait for this rank's send
            h = mx.depends(mx.zeros(h.shape, dtype=h.dtype), h)
        h = mx.distributed.all_sum(h, group=g)
        logits = self.model.embed_tokens.as_linear(h) if self.args.tie_word_embeddings else self.lm_head(h)
        # every rank runs every call's transfers now, whatever its caller evaluates (a prefill
        # evaluates only the caches, a generator may drop its last step): no send without its recv
        mx.eval(logits)
        return logits  # (B, L, V)


def shard(model, group, mode: str = "tensor") -> None:
    if mode not in PARALLEL_MODES:
        raise InputError(f"--parallel must be one of {', '.join(PARALLEL_MODES)}, got {mode!r}")
    if not hasattr(model, "args") or not hasattr(model.args, "num_key_value_heads"):
        raise InputError("distributed inference runs the Llama family only (this model comes from mlx-lm's zoo)")
    if hasattr(model, "unstack_projections"):
        model.unstack_projections()
    (shard_tensor if mode == "tensor" else shard_pipeline)(model, group)
    model.parallel = (mode, group.size())


# --- agreeing on tokens and text -------------------------------------------------------------

def from_rank0(x: mx.array, group) -> mx.array:
    """rank 0's `x` on every rank: the others contribute zeros to one all_sum. The zeros are made
    from their own `x`, so that on every rank the all_sum comes after the collectives `x` depends
    on (the ring backend pairs collectives in the order each rank runs them)."""
    mine = x if group.rank() == 0 else x * 0
    return mx.distributed.all_sum(mine, group=group).astype(x.dtype)


def shared_sampler(sampler, group):
    """rank 0's tokens on every rank: one all_sum per step."""
    def sample(logprobs: mx.array) -> mx.array:
        return from_rank0(sampler(logprobs), group)

    return sample


def broadcast_int(value: int, group) -> int:
    """rank 0's integer on every rank."""
    return int(mx.distributed.all_sum(mx.array([value if group.rank() == 0 else 0]), group=group).item())


def broadcast_text(text: str | None, group) -> str | None:
    """rank 0's text (None: end of input) on every rank."""
    root = group.rank() == 0
    data = text.encode("utf-8") if root and text is not None else b""
    n = broadcast_int(len(data) + 1 if root and text is not None else 0, group)  # 0: None
    if n <= 1:
        return None if n == 0 else ""
    buf = mx.array(memoryview(data)) if root else mx.zeros((n - 1,), dtype=mx.uint8)  # the others add zeros
    return bytes(mx.distributed.all_sum(buf, group=group)).decode("utf-8")


def quiet_other_ranks(group) -> None:
    """Only rank 0 writes to stdout; the others keep stderr for their own errors."""
    if group.rank() != 0:
        sys.stdout = open(os.devnull, "w")


class Watchdog:
    """Ends this process with one line when a collective waits longer than `timeout` seconds
    (a peer rank that hangs). Armed around model work; disarmed while rank 0 waits for input."""

    def __init__(self, rank: int, timeout: float):
        self.rank, self.timeout = rank, timeout
        self._deadline: float | None = None
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, daemon=True).start()

    def beat(self) -> None:
        with self._lock:
            self._deadline = time.monotonic() + self.timeout

    def pause(self) -> None:
        with self._lock:
            self._deadline = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            with self._lock:
                late = self._deadline is not None and time.monotonic() > self._deadline
            if late:
                sys.stderr.write(f"error: rank {self.rank}: no answer from the other ranks for {self.timeout:g} s "
                                 "(a rank hangs or died); stopping\n")
                sys.stderr.flush()
                os._exit(1)


def watched(model, watchdog: Watchdog):
    """Calls of the model beat the watchdog first, so a step that never returns is caught."""
    call = model.__class__.__call__

    def __call__(self, *args, **kwargs):
        watchdog.beat()
        return call(self, *args, **kwargs)

    model.__class__ = type(model.__class__.__name__, (model.__class__,), {"__call__": __call__})
    return model
