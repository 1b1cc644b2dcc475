"""Reranking retrieved chunks by the model itself: query likelihood, the mean log-probability of
the question's tokens after the chunk, computed for all candidates in one batched forward pass.

BM25 matches words; the model also knows that "How do I serve the API?" is likely after a passage
about `mlxllama serve`, even when the passage says "Serving". Each candidate is cut to its first
`max_tokens` tokens (the heading path comes first), so the pass costs at most
candidates x max_tokens tokens whatever the chunk size.
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx

from ..models import make_cache
from .retrieve import Chunk


def question_likelihoods(model, tokenizer, chunks: list[Chunk], question: str, max_tokens: int = 160) -> list[float]:
    """Mean log P(question token | chunk, previous question tokens) for each chunk, one batched pass.
    Rows are padded on the right, so causal attention keeps the padding out of every real position."""
    q = tokenizer.encode(" " + " ".join(question.split()), add_special_tokens=False)
    rows, starts = [], []
    for c in chunks:
        head = f"{c.heading}\n" if c.heading else ""
        ctx = tokenizer.encode(f"{head}{c.text.strip()}", add_special_tokens=False)[:max_tokens]
        ctx += tokenizer.encode("\n\nQuestion:", add_special_tokens=False)
        starts.append(len(ctx))
        rows.append(ctx + q)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = mx.array([r + [pad] * (width - len(r)) for r in rows], dtype=mx.int32)  # (B, L)
    logits = model(tokens, cache=make_cache(model))  # (B, L, V)
    out = []
    for b, start in enumerate(starts):
        lg = logits[b, start - 1 : start - 1 + len(q)]  # (len(q), V): predictions of the question's tokens
        lp = lg - mx.logsumexp(lg, axis=-1, keepdims=True)
        picked = mx.take_along_axis(lp, mx.array(q)[:, None], axis=-1)
        out.append(float(picked.mean().item()))
    return out


def rerank(model, tokenizer, chunks: list[Chunk], question: str, max_tokens: int = 160) -> list[Chunk]:
    """The chunks ordered by query likelihood, best first (each keeps its BM25 score)."""
    if len(chunks) < 2:
        return list(chunks)
    scores = question_likelihoods(model, tokenizer, chunks, question, max_tokens)
    order = sorted(range(len(chunks)), key=lambda i: (-scores[i], i))
    return [replace(chunks[i], likelihood=scores[i]) for i in order]
