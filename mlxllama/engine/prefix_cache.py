"""A prefix cache: KV states of token sequences already computed, found by longest common prefix.

Entries sit in a trie over token ids; a lookup walks the query down the trie and the deepest node
any entry passes through gives the longest common prefix with something cached. The hit is that
entry's states cut to the common length: new arrays, so the request that uses them can never
change the entry. Entries are byte-accounted (the arrays' nbytes) and the least recently used go
first when `max_bytes` is exceeded; an entry that is a prefix of a new one is dropped (the new one
covers it). An optional disk tier (engine.disk.DiskCache) is asked when memory has nothing as
long, and is written through on insert when `persist=True`.

Only full-history caches (KVCache and QuantizedKVCache states) are cached: a rotating cache has
forgotten positions, so its state is no prefix of anything.
"""

from __future__ import annotations

import collections
import itertools
import threading
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx

FLOAT = "float"


def kind_of(bits: int | None, group_size: int = 64) -> str:
    """The cache kind label of stored states: 'float' or 'q<bits>g<group>'."""
    return FLOAT if bits is None else f"q{bits}g{group_size}"


def _cut(x, n: int):
    return tuple(a[..., :n, :] for a in x) if isinstance(x, tuple) else x[..., :n, :]


def cut_states(states: list, n: int) -> list:
    """The first n positions of per-layer (k, v) states, as new arrays."""
    return [(_cut(k, n), _cut(v, n)) for k, v in states]


def states_nbytes(states: list) -> int:
    total = 0
    for kv in states:
        for x in kv:
            total += sum(a.nbytes for a in x) if isinstance(x, tuple) else x.nbytes
    return total


def _copy(x):
    return tuple(mx.contiguous(a) for a in x) if isinstance(x, tuple) else mx.contiguous(x)


@dataclass
class Entry:
    tokens: tuple[int, ...]
    states: list  # per layer (k, v): arrays (1, Hkv, n, Dh), or (packed, scales, biases) triples
    kind: str
    nbytes: int


@dataclass
class Hit:
    length: int  # tokens covered
    states: list  # per layer (k, v), exactly `length` positions, safe to extend
    kind: str
    source: str  # "memory" or "disk"


class _Node:
    __slots__ = ("children", "entries")

    def __init__(self):
        self.children: dict[int, _Node] = {}
        self.entries: set[int] = set()


class PrefixCache:
    def __init__(self, max_bytes: int = 2 << 30, disk=None, persist: bool = False, min_tokens: int = 8):
        self.max_bytes, self.min_tokens = max_bytes, min_tokens
        self.disk, self.persist = disk, persist
        self._entries: collections.OrderedDict[int, Entry] = collections.OrderedDict()  # LRU order
        self._roots: dict[str, _Node] = {}  # one trie per cache kind
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    # -- lookup ------------------------------------------------------------------------------

    def _walk(self, root: _Node, tokens: Sequence[int], limit: int) -> tuple[int, int | None]:
        """(depth, an entry id) for the deepest node within `limit` tokens that an entry passes."""
        node, depth, best = root, 0, (0, None)
        for t in tokens[:limit]:
            node = node.children.get(t)
            if node is None or not node.entries:
                break
            depth += 1
            best = (depth, node.entries)
        if best[1] is None:
            return 0, None
        newest = next(i for i in reversed(self._entries) if i in best[1])  # the most recently used
        return best[0], newest

    def lookup(self, tokens: Sequence[int], kinds: Sequence[str] = (FLOAT,), keep_last: bool = True,
               probe: bool = False):
        """The longest cached prefix of `tokens` (at least min_tokens) among entries of these kinds,
        or None. keep_last leaves at least one token to run (its logits are needed to go on).
        probe=True only says how long the hit would be (0: none), copying and loading nothing."""
        tokens = list(tokens)
        limit = len(tokens) - 1 if keep_last else len(tokens)
        if probe:
            return self._probe(tokens, kinds, limit)
        best: tuple[int, int | None, str] = (0, None, FLOAT)
        with self._lock:
            for kind in kinds:
                root = self._roots.get(kind)
                if root is not None:
                    depth, eid = self._walk(root, tokens, limit)
                    if depth > best[0]:
                        best = (depth, eid, kind)
            hit = None
            if best[1] is not None and best[0] >= self.min_tokens:
                self._entries.move_to_end(best[1])
                hit = Hit(best[0], cut_states(self._entries[best[1]].states, best[0]), best[2], "memory")
        if self.disk is not None:
            found = self.disk.lookup(tokens, kinds, limit)
            if found is not None and found.length > (hit.length if hit else 0) and found.length >= self.min_tokens:
                hit = found
                self.insert(tokens[: found.length], found.states, found.kind, write_disk=False)
        if hit is None:
            self.misses += 1
        else:
            self.hits += 1
        return hit

    def _probe(self, tokens: list[int], kinds: Sequence[str], limit: int) -> int:
        with self._lock:
            best = max((self._walk(self._roots[k], tokens, limit)[0] for k in kinds if k in self._roots), default=0)
        if self.disk is not None:
            best = max(best, self.disk.probe(tokens, kinds, limit))
        return best if best >= self.min_tokens else 0

    # -- insert and evict --------------------------------------------------------------------

    def insert(self, tokens: Sequence[int], states: list, kind: str = FLOAT, write_disk: bool | None = None) -> None:
        """Stores copies of `states` (per layer (k, v), exactly len(tokens) positions)."""
        tokens = tuple(int(t) for t in tokens)
        if not tokens:
            return
        states = [(_copy(k), _copy(v)) for k, v in cut_states(states, len(tokens))]
        mx.eval(states)
        nbytes = states_nbytes(states)
        if (self.persist if write_disk is None else write_disk) and self.disk is not None:
            self.disk.save(tokens, states, kind)
        if nbytes > self.max_bytes:
            return
        with self._lock:
            root = self._roots.setdefault(kind, _Node())
            # an entry already holding these tokens and more covers the new one
            node = root
            for t in tokens:
                node = node.children.get(t)
                if node is None:
                    break
            if node is not None and node.entries:
                self._entries.move_to_end(next(iter(node.entries)))
                return
            eid = next(self._ids)
            entry = Entry(tokens, states, kind, nbytes)
            # entries that are a prefix of the new one are dropped
            node = root
            for t in tokens:
                node = node.children.setdefault(t, _Node())
                node.entries.add(eid)
            for other in [i for i, e in self._entries.items() if e.kind == kind and len(e.tokens) < len(tokens)
                          and tokens[: len(e.tokens)] == e.tokens]:
                self._remove(other)
            self._entries[eid] = entry
            self.nbytes += nbytes
            while self.nbytes > self.max_bytes and self._entries:
                self._remove(next(iter(self._entries)))

    def _remove(self, eid: int) -> None:
        entry = self._entries.pop(eid)
        self.nbytes -= entry.nbytes
        node = self._roots[entry.kind]
        for t in entry.tokens:  # a node no entry passes any more has none below it either
            child = node.children[t]
            child.entries.discard(eid)
            if not child.entries:
                del node.children[t]
                break
            node = child

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._roots.clear()
            self.nbytes = 0
