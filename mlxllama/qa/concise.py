"""The short answer inside a generated sentence.

A small model often restates the question before answering it ("Ada Lovelace was born on 10
December 1815.") and runs on past the answer ("..., making it the highest mountain in Africa").
`concise_answer` keeps the words the question does not already hold and returns the longest run of
them, within one clause, that the passages contain word for word (leading function words dropped:
"in 1889" -> "1889"); CJK text, without spaces, loses the beginning and end of its first clause
that the question holds. When nothing is found the sentence is not shortened: the short answer
is always text the documents hold.
"""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n")
_CLAUSE_END = (",", ";", ":")
_EDGE = ".,;:!?\"'()[]“”‘’"
_CJK = re.compile(r"[\u3000-\u30ff\u3400-\u9fff\uf900-\ufaff\uff00-\uffef]")


def _stem(word: str) -> str:
    from .retrieve import terms

    t = terms(word)
    return t[0] if t else ""


def _key(word: str) -> str:
    w = word.strip(_EDGE).lower()
    return w[:-2] if w.endswith(("'s", "’s")) else w


def concise_answer(answer: str, question: str, passages: list[str]) -> str | None:
    """The shortest form of `answer` the passages hold word for word, or None when `answer` is
    already short, restates nothing, or no part of it is found in the passages."""
    from bm25s.stopwords import STOPWORDS_EN_PLUS as STOPWORDS_EN

    if _CJK.search(answer):
        return _concise_cjk(answer, question, passages)
    first = _SENTENCE_END.split(answer.strip(), maxsplit=1)[0].strip()
    words = first.split()
    if len(words) < 2:
        return None
    asked = {_stem(w) for w in question.split()} - {""}
    stop = set(STOPWORDS_EN)

    def restated(word: str) -> bool:
        k = _key(word)
        return not k or k in stop or _stem(k) in asked

    new = [i for i, w in enumerate(words) if not restated(w)]
    if not new:
        return None
    haystack = [" ".join(p.split()).lower() for p in passages]

    def found(run: list[str]) -> bool:
        text = " ".join(run).strip(_EDGE).lower()
        pattern = re.compile(r"(?<!\w)" + re.escape(text) + r"(?!\w)")
        return bool(text) and any(pattern.search(h) for h in haystack)

    region = words[new[0] : new[-1] + 1]
    if found(region):  # "Paris, France" stays whole when the documents say it so
        text = " ".join(region).strip(_EDGE)
        return text if text != answer.strip().strip(_EDGE) else None

    def crosses_clause(run: list[str]) -> bool:  # "..., making it the highest mountain in Africa"
        return any(w.endswith(_CLAUSE_END) for w in run[:-1])

    best = None
    for size in range(len(region), 0, -1):
        # of equal runs the last: the answer follows what restates the question ("X was born on Y")
        for start in range(len(region) - size, -1, -1):
            run = region[start : start + size]
            if restated(run[0]) or restated(run[-1]) or crosses_clause(run):
                continue
            if found(run):
                best = run
                break
        if best:
            break
    if best is None:
        return None
    text = " ".join(best).strip(_EDGE)
    return text if text and text != answer.strip().strip(_EDGE) else None


_CJK_CLAUSE = re.compile(r"[。，；！？、,;!?\n]")


def _concise_cjk(answer: str, question: str, passages: list[str]) -> str | None:
    """CJK text has no spaces: the first clause without its longest beginning and end that the
    question holds ("空间站运行在约400公里高的轨道上" after "空间站运行在多高的轨道上？" -> "约400公里"),
    when the passages hold the rest."""
    clause = _CJK_CLAUSE.split(answer.strip(), maxsplit=1)[0].strip()
    q = question.strip()

    def edge(text: str, from_start: bool) -> int:
        for n in range(len(text) - 1, 1, -1):  # at least two characters, never the whole clause
            if (text[:n] if from_start else text[-n:]) in q:
                return n
        return 0

    head = edge(clause, True)
    rest = clause[head:]
    tail = edge(rest, False) if len(rest) > 2 else 0
    short = rest[: len(rest) - tail].strip()
    if not (head or tail) or not short or not any(short in p for p in passages):
        return None
    return short


def grounded(answer: str, passages: list[str]) -> bool:
    """Whether any content word of `answer` (stemmed; CJK characters) occurs in the passages. An
    answer sharing none of them was not read there (a small model sometimes repeats the worked
    example of its prompt instead)."""
    from .retrieve import terms

    wanted = set(terms(answer))
    if not wanted:
        return True
    return any(wanted & set(terms(p)) for p in passages)
