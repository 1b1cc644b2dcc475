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

import math
import re

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n")
_CLAUSE_END = (",", ";", ":")
_LIST_MARK = re.compile(r"^(?:\d{1,2}[.)]|[-*•])\s+(?=\S)")
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
    body = _LIST_MARK.sub("", answer.strip(), count=1)  # "1. The light turns green ...": a list's first item
    first = _SENTENCE_END.split(body, maxsplit=1)[0].strip()
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
    """CJK text has no spaces: the first clause, without its longest beginning and end that the
    question holds ("空间站运行在约400公里高的轨道上" after "空间站运行在多高的轨道上？" -> "约400公里"), that
    does not restate the question (most of its characters in the question: "长城被列入世界遗产名录，1987年"
    after "长城哪一年被列入世界遗产名录？" -> "1987年"), when the passages hold it."""
    clauses = [c.strip() for c in _CJK_CLAUSE.split(answer.strip()) if c.strip()]
    q = question.strip()

    def edge(text: str, from_start: bool) -> int:
        for n in range(len(text) - 1, 1, -1):  # at least two characters, never the whole clause
            if (text[:n] if from_start else text[-n:]) in q:
                return n
        return 0

    def restates(text: str) -> bool:
        return sum(ch in q for ch in text) >= 0.6 * len(text)

    for clause in clauses:
        head = edge(clause, True)
        rest = clause[head:]
        tail = edge(rest, False) if len(rest) > 2 else 0
        short = rest[: len(rest) - tail].strip()
        if not short or restates(short):
            continue
        if not any(short in p for p in passages) or short == answer.strip().rstrip("。．.！!？?").strip():
            return None
        return short
    return None


def grounded(answer: str, passages: list[str]) -> bool:
    """Whether any content word of `answer` (stemmed; CJK characters) occurs in the passages. An
    answer sharing none of them was not read there (a small model sometimes repeats the worked
    example of its prompt instead)."""
    from .retrieve import terms

    wanted = set(terms(answer))
    if not wanted:
        return True
    return any(wanted & set(terms(p)) for p in passages)


# "How do I serve the API?", "how can we install it", "how to convert a model": a question asking
# for a procedure, which technical documents answer with a command in a code span
_HOW_TO = re.compile(r"\bhow\s+(?:(?:do|can|could|should|would|may|might|must|shall)\s+(?:i|we|you|one)|to)\b",
                     re.IGNORECASE)
_FENCED = re.compile(r"^[ \t]*(```|~~~)[^\n]*\n(.*?)^[ \t]*\1[ \t]*$", re.DOTALL | re.MULTILINE)
_INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


def asks_how(question: str) -> bool:
    """Whether the question asks how to do something ("How do I ...?", "how to ...")."""
    return bool(_HOW_TO.search(question))


def code_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of the code in a text: each non-empty line of a fenced block
    and each inline `code` span outside fences, without the backticks; in order."""
    spans, fenced = [], []
    for m in _FENCED.finditer(text):
        fenced.append((m.start(), m.end()))
        pos = m.start(2)
        for line in m.group(2).splitlines(keepends=True):
            body = line.strip()
            if body and not body.startswith("#"):
                lead = len(line) - len(line.lstrip())
                spans.append((pos + lead, pos + lead + len(body)))
            pos += len(line)
    for m in _INLINE.finditer(text):
        if not any(a <= m.start() < b for a, b in fenced) and m.group(1).strip():
            lead = len(m.group(1)) - len(m.group(1).lstrip())
            spans.append((m.start(1) + lead, m.start(1) + lead + len(m.group(1).strip())))
    return sorted(spans)


def command_answer(question: str, passages: list[str], sentence: str = "") -> tuple[int, int, int] | None:
    """For a question asking how to do something, the code span of the passages that answers it:
    one holding a content word of the question (stemmed) and more than the question's words, never
    the question itself, nor an aligned listing (runs of spaces: a file tree, a table). Of several,
    the one holding most of the question's words (the rarer among the spans weigh more), then the one
    sharing most words with the model's own sentence, then the first passage's. Returns (passage
    index, start, end) or None."""
    from .metrics import normalize_answer
    from .retrieve import terms

    if not asks_how(question):
        return None
    asked = set(terms(question))
    if not asked:
        return None
    said = set(terms(sentence))
    q_norm = normalize_answer(question)
    candidates = []  # (passage, start, end, its terms)
    for i, passage in enumerate(passages):
        for start, end in code_spans(passage):
            code = passage[start:end]
            if "  " in code:  # an aligned listing (a file tree, a table), not a command
                continue
            words = set(terms(code))
            if words & asked and not words <= asked and not (q_norm and q_norm in normalize_answer(code)):
                candidates.append((i, start, end, words))
    df = {t: sum(t in c[3] for c in candidates) for t in asked}

    def key(c):  # the question's rarer words count more ("convert" over "model")
        held = sum(math.log(1 + len(candidates) / df[t]) for t in c[3] & asked)
        return (round(held, 6), len(c[3] & said), -c[0], -c[1])

    best = max(candidates, key=key, default=None)
    return best[:3] if best else None
    return best
