"""Long documents: chunks on paragraph and heading boundaries with character offsets and the
heading path they sit under, ranked by BM25 against the question.

BM25 comes from `bm25s`; the terms are lower-cased words without English stopwords (bm25s's extended list), stemmed with
PyStemmer's English Snowball stemmer ("serving" and "serve" are one term), and for
Chinese/Japanese/Korean text (no spaces between words) single characters plus character bigrams.
A chunk is indexed with its heading path, so a section is found by its title too.
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
    heading: str = ""  # the headings above the chunk, outermost first: "Serving > Security"
    likelihood: float | None = None  # the reranker's mean log P(question token | chunk)

    def as_dict(self) -> dict:
        out = {"source": self.source, "start": self.start, "end": self.end, "heading": self.heading,
               "score": round(self.score, 4)}
        if self.likelihood is not None:
            out["likelihood"] = round(self.likelihood, 4)
        return out


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


_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
_FENCE = re.compile(r"^[ \t]*(```|~~~)")
_PARAGRAPH = re.compile(r"\n[ \t]*\n")


def _blocks(text: str) -> list[tuple[int, int, str, bool]]:
    """(start, end, heading path, is a heading line) for each paragraph and heading of a text.
    Headings are Markdown ATX headings outside code fences (HTML and DOCX are read into that form)."""
    out: list[tuple[int, int, str, bool]] = []
    path: list[tuple[int, str]] = []
    fenced, para_start, pos = False, None, 0

    def close(end: int) -> None:
        nonlocal para_start
        if para_start is not None and text[para_start:end].strip():
            out.append((para_start, end, " > ".join(t for _, t in path), False))
        para_start = None

    for line in text.splitlines(keepends=True):
        bare = line.rstrip("\n")
        if _FENCE.match(bare):
            fenced = not fenced
        m = None if fenced else _HEADING.match(bare)
        if m:
            close(pos)
            level = len(m.group(1))
            path = [(lv, t) for lv, t in path if lv < level] + [(level, m.group(2).strip())]
            out.append((pos, pos + len(bare), " > ".join(t for _, t in path), True))
        elif not bare.strip() and not fenced:
            close(pos)
        elif para_start is None:
            para_start = pos
        pos += len(line)
    close(len(text.rstrip()))
    return [(a, a + len(text[a:b].rstrip()), h, is_h) for a, b, h, is_h in out]


def split_sections(doc: Document, size: int, index: int = 0) -> list[Chunk]:
    """Chunks of at most about `size` characters made of whole paragraphs of one section (a heading
    starts a new chunk and heads it); a paragraph longer than `size` is cut at sentence ends."""
    text, size = doc.text, max(size, 16)
    chunks: list[Chunk] = []
    cur: list[int] | None = None  # [start, end]
    cur_heading, bare = "", False  # bare: the chunk holds only its heading line so far

    def flush() -> None:
        nonlocal cur
        if cur is not None and not bare:  # a lone heading is no passage (every chunk names its path)
            chunks.append(Chunk(doc.source, cur[0], cur[1], text[cur[0] : cur[1]], index, heading=cur_heading))
        cur = None

    for start, end, heading, is_heading in _blocks(text):
        if is_heading:
            flush()
            cur, cur_heading, bare = [start, end], heading, True
            continue
        if cur is not None and (heading != cur_heading or (end - cur[0] > size and not (bare and end - start <= size))):
            flush()
        if cur is None and end - start > size:  # a long paragraph: sentence-sized pieces of it
            pos = start
            while pos < end:
                cut = _cut(text[:end], pos, pos + size)
                if text[pos:cut].strip():
                    lead = len(text[pos:cut]) - len(text[pos:cut].lstrip())
                    chunks.append(Chunk(doc.source, pos + lead, cut, text[pos + lead : cut], index, heading=heading))
                pos = cut
            continue
        if cur is None:
            cur, cur_heading = [start, end], heading
        else:
            cur[1] = end
        bare = False
    flush()
    return [replace(c, text=c.text.rstrip(), end=c.start + len(c.text.rstrip())) for c in chunks if c.text.strip()]


def _stemmer():
    global _STEMMER
    if _STEMMER is None:
        import Stemmer

        _STEMMER = Stemmer.Stemmer("english")
    return _STEMMER


_STEMMER = None


def terms(text: str) -> list[str]:
    """BM25 terms: lower-cased, stemmed words minus stopwords; CJK runs as characters and bigrams."""
    from bm25s.stopwords import STOPWORDS_EN_PLUS as STOPWORDS_EN

    stop = _stopwords(STOPWORDS_EN)
    words: list[str] = []
    out: list[str] = []
    for word in _WORD.findall(text.lower()):
        if _CJK.search(word):
            chars = [c for c in word if _CJK.match(c)]
            rest = _CJK.sub(" ", word).split()
            out.extend(chars)
            out.extend(a + b for a, b in zip(chars, chars[1:]))
            words.extend(w for w in rest if w not in stop)
        elif word not in stop:
            words.append(word)
    return out + _stemmer().stemWords(words)


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
    corpus = [terms(f"{c.heading}\n{c.text}") for c in chunks]
    query = [t for t in terms(question) if t]
    if not query or not any(corpus):
        return list(chunks)
    retriever = bm25s.BM25()
    retriever.index(corpus, show_progress=False)
    scores = np.asarray(retriever.get_scores(query), dtype=np.float64)
    order = sorted(range(len(chunks)), key=lambda i: (-scores[i], i))
    return [replace(chunks[i], score=float(scores[i])) for i in order]


def heading_at(text: str, offset: int) -> str:
    """The heading path in force at a character offset of a text ("" before any heading)."""
    heading = ""
    for start, _, path, _ in _blocks(text):
        if start > offset:
            break
        heading = path
    return heading


# words that belong to the question's form, not to what it is about: "how *long* *must* it be held",
# "什么", "哪里": the passages holding the answer rarely hold them
_ASKING = re.compile(r"\bhow\s+(?:many|much|long|old|high|large|big|far|often|tall|wide|deep|soon|heavy|fast)\b"
                     r"|\b(?:must|would|could|might|shall)\b"
                     r"|什么|哪里|哪儿|哪些|哪个|哪一|哪|多少|多长|多高|多大|多久|多远|几|谁|吗|呢|怎么|怎样|如何|为什么|是否",
                     re.IGNORECASE)


def question_terms(question: str) -> set[str]:
    """The question's terms without the words of its form ("how many", "什么")."""
    return set(terms(_ASKING.sub(" ", question)))


def coverage(question: str, chunks: list[Chunk]) -> float:
    """The share of the question's terms (stemmed, no stopwords, not the words of its form such as
    "how many") that occur in the chunks: 1.0 when every content word of the question is there. A
    term of five or more characters also counts when a term of the chunks differs from it only in
    its last character (the stemmer keeps "shelf" and "shelv" apart). One signal for "not in the
    documents"."""
    wanted = question_terms(question)
    if not wanted:
        return 1.0
    have: set[str] = set()
    for c in chunks:
        have |= set(terms(f"{c.heading}\n{c.text}"))
    present = wanted & have
    for w in wanted - present:
        if len(w) >= 5 and any(len(h) >= len(w) - 1 and h[: len(w) - 1] == w[:-1] for h in have):
            present.add(w)
    return len(present) / len(wanted)
