"""Long documents: overlapping chunks with character offsets, ranked by BM25 against the question.

BM25 comes from `bm25s`; the terms are lower-cased words without English stopwords, and for
Chinese/Japanese/Korean text (no spaces between words) single characters plus character bigrams.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from .context import Document

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
# preferred places to end a chunk, best first
_BREAKS = ("\n\n", "\n", "。", "！", "？", ". ", "! ", "? ", "; ", ", ", " ")


@dataclass(frozen=True)
class Chunk:
    source: str
    start: int  # character offsets in the source document
    end: int
    text: str
    doc: int = 0  # index of the document
    score: float = 0.0  # BM25 score against the question (0 when not ranked)

    def as_dict(self) -> dict:
        return {"source": self.source, "start": self.start, "end": self.end, "score": round(self.score, 4)}


def whole(doc: Document, index: int = 0) -> Chunk:
    return Chunk(doc.source, 0, len(doc.text), doc.text, index)


def _cut(text: str, start: int, end: int) -> int:
    """An end offset <= end at a natural break in the last third of text[start:end]."""
    if end >= len(text):
        return len(text)
    floor = start + (end - start) * 2 // 3
    for sep in _BREAKS:
        i = text.rfind(sep, floor, end)
        if i >= 0:
            return i + len(sep)
    return end


def split_document(doc: Document, size: int, overlap: int, index: int = 0) -> list[Chunk]:
    """Chunks of about `size` characters; each starts `overlap` characters before the previous end
    (moved forward to a word start), so a passage cut by one boundary is whole in a neighbour."""
    text, n = doc.text, len(doc.text)
    size = max(size, 16)
    overlap = min(max(overlap, 0), size // 2)
    chunks, start = [], 0
    while start < n:
        end = _cut(text, start, start + size)
        chunks.append(Chunk(doc.source, start, end, text[start:end], index))
        if end >= n:
            break
        nxt = max(end - overlap, start + 1)
        space = text.find(" ", nxt, end)
        if overlap and space >= 0:
            nxt = space + 1
        start = nxt if nxt < end else end
    return [c for c in chunks if c.text.strip()]


def terms(text: str) -> list[str]:
    """BM25 terms: lower-cased words minus stopwords; CJK runs as characters and bigrams."""
    from bm25s.stopwords import STOPWORDS_EN

    stop = _stopwords(STOPWORDS_EN)
    out: list[str] = []
    for word in _WORD.findall(text.lower()):
        if _CJK.search(word):
            chars = [c for c in word if _CJK.match(c)]
            rest = _CJK.sub(" ", word).split()
            out.extend(chars)
            out.extend(a + b for a, b in zip(chars, chars[1:]))
            out.extend(w for w in rest if w not in stop)
        elif word not in stop:
            out.append(word)
    return out


_STOP_CACHE: dict[int, frozenset] = {}


def _stopwords(words) -> frozenset:
    key = id(words)
    if key not in _STOP_CACHE:
        _STOP_CACHE[key] = frozenset(words)
    return _STOP_CACHE[key]


def rank(chunks: list[Chunk], question: str) -> list[Chunk]:
    """The chunks with their BM25 scores, best first (ties keep document order)."""
    import bm25s
    import numpy as np

    if not chunks:
        return []
    corpus = [terms(c.text) for c in chunks]
    query = [t for t in terms(question) if t]
    if not query or not any(corpus):
        return list(chunks)
    retriever = bm25s.BM25()
    retriever.index(corpus, show_progress=False)
    scores = np.asarray(retriever.get_scores(query), dtype=np.float64)
    order = sorted(range(len(chunks)), key=lambda i: (-scores[i], i))
    return [replace(chunks[i], score=float(scores[i])) for i in order]
