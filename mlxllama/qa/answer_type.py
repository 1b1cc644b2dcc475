"""The kind of answer a question asks for, and the spans of the passages that are of that kind.

"How many nurses will be hired?" asks for a quantity, "When is the next meeting?" for a date, "Who
chaired the meeting?" for a name. A small model often reads the right sentence and answers with the
wrong part of it (another date of the passage, the unit without its number), or with a sentence
from elsewhere. `typed_answer` picks the span itself: the sentences of the passages are scored by
the question's words they hold (each weighted by how rare it is among the sentences), and in the
best sentence that has spans of the asked kind, the span nearest the question's words is the
answer; the model's own answer wins when it is one of that sentence's spans. Questions of other
kinds ("What does vacca mean?") are left to the model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .metrics import normalize_answer
from .retrieve import question_terms, terms

_NUMBER_WORDS = ("one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|fifteen|"
                 "sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety|"
                 "hundred|a hundred|a thousand|dozen|a dozen|half")
_NUM = (r"(?:[$£€¥]\s?)?(?<![\w.])\+?\d(?:[\d,]*\d)?(?:\.\d+)?(?:\s\d{3,}(?![\d,.]\d))*(?:\s?(?:%|percent|per cent|million|billion|thousand|"
        r"hundred|k|m|bn))?(?![\w])"
        rf"|\b(?:{_NUMBER_WORDS})(?:[- ](?:{_NUMBER_WORDS}))?\b")
_RANGE = rf"(?:{_NUM})(?:\s?(?:to|-|–|and|or)\s?(?:{_NUM}))?"
_MONTH = (r"(?:January|February|March|April|May|June|July|August|September|October|November|December|"
          r"(?:Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)\b\.?)")
_DAY = r"\d{1,2}(?:st|nd|rd|th)?"
_TIME = r"(?:\s(?:at\s)?\d{1,2}(?::\d{2})?\s?(?:am|pm|a\.m\.|p\.m\.))?"
_DATE_EN = re.compile(
    rf"\b(?:{_DAY}\s{_MONTH}(?:,?\s\d{{4}})?|{_MONTH}\s{_DAY}(?:,?\s\d{{4}})?|{_MONTH}\s\d{{4}}|{_MONTH}){_TIME}"
    r"|(?<![\w-])\d{4}-\d{2}-\d{2}(?![\w-])"
    r"|(?<![\w.,-])(?:1[0-9]|20)\d{2}s?(?![\w-]|[.,]\d)"
    r"|\b(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)\b")
_QUANTITY_EN = re.compile(_RANGE, re.IGNORECASE)
_CJK_UNIT = (r"千米|公里|公斤|千克|平方米|立方米|米|厘米|毫米|吨|克|元|美元|万元|亿元|岁|年|个月|月|周|天|日|小时|分钟|秒|名|位|人|个|只|块|次|座|种|"
             r"件|本|辆|层|条|%|％|倍|度")
_CJK_NUM = r"(?:\d(?:[\d,]*\d)?(?:\.\d+)?|[一二三四五六七八九十百千万亿两零]+)(?:万|亿)?"
_QUANTITY_CJK = re.compile(rf"约?{_CJK_NUM}(?:多|余)?(?:{_CJK_UNIT})?")
_DATE_CJK = re.compile(r"\d{2,4}年(?:\d{1,2}月(?:\d{1,2}[日号])?)?|\d{1,2}月\d{1,2}[日号]|[一二三四五六七八九十]+世纪")
_NAME = re.compile(r"(?<![\w'’])[A-Z][\w'’.-]*[\w](?:\s+(?:(?:de|van|von|der|da|di|du|le|la|of|bin|al)\s+)?"
                   r"[A-Z][\w'’.-]*[\w])*")

_ASKS = [  # (pattern, kind), the first that matches wins
    (re.compile(r"\bhow\s+(?:many|much|old|high|tall|long|far|large|big|heavy|deep|wide|often|fast)\b"
                r"|\b(?:what|which)\s+(?:(?:is|was|are|were)\s+)?(?:the\s+)?(?:[\w'’-]+\s+){0,3}?(?:number|total|"
                r"price|cost|amount|salary|budget|fee|rate|percentage|extension|population|length|height|weight|"
                r"size|speed|temperature|age|capacity|count|period|duration)\b"
                r"|\bwhat\s+(?:percentage|number|amount|temperature|speed|distance|depth|height|weight|size|price)\b",
                re.IGNORECASE), "quantity"),
    (re.compile(r"^\s*when\b|\bwhen\s+(?:is|was|are|were|did|does|do|will|should|must|can)\b"
                r"|\b(?:what|which)\s+(?:year|date|day|month|time|century|decade)\b"
                r"|\bin\s+what\s+year\b", re.IGNORECASE), "date"),
    (re.compile(r"\b(?:what|how)\s+(?:is|are|was|were)\s+.+?\s+(?:called|named|known\s+as)\b", re.IGNORECASE),
     "called"),
    (re.compile(r"\bwhat\s+(?:is|was|are|were)\s+(?:the\s+)?(?:\w+\s+)?names?\s+of\b", re.IGNORECASE), "name"),
    (re.compile(r"^\s*(?:who|whom|whose)\b|\bwho\s+(?:is|was|were|are|did|does|will|has|had)\b|"
                r"\bby\s+whom\b", re.IGNORECASE), "name"),
    (re.compile(r"什么时候|何时|哪一年|哪年|哪天|哪一天|几月|几号|日期|时间是"), "date"),
    (re.compile(r"多少|几|多高|多长|多大|多久|多远|多重|多深|多宽"), "quantity"),
]
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# a sentence ends at . ! ? before a capital (not after "No." or "Dr."), at a semicolon, at CJK stops
# and at line ends
_BREAK = re.compile(r"(?<!\b[A-Z][a-z]\.)(?<!\b[A-Z]\.)(?<=[.!?])\s+(?=[^a-z0-9])|(?<=;)\s+|(?<=[。！？；])|\n+")
_FUNCTION = r"(?:and|or|but|which|who|that|in|on|at|by|for|with|from|after|before|because|since|when)\b"
_CALLED = re.compile(r"\b(?:called|named|known\s+as)\s+[\"“']?([^\s,.;:!?\"“”]+(?:\s+(?!" + _FUNCTION + r")[^\s,.;:!?\"“”]+){0,4})"
                     r"(?=[\"”']?(?:[,.;:!?)]|\s+" + _FUNCTION + r"|$))")
# a sentence holding less than this share of the best sentence's question words is about something else
MIN_SHARE = 0.5
_NOT_UNITS = {"per", "each", "every", "a", "an", "plus", "times", "th", "st", "nd", "rd"}
_COUNT = re.compile(r"\bhow\s+many\b", re.IGNORECASE)
_LEAD = re.compile(r"^(?:about|around|roughly|approximately|nearly|almost|over|under|some|only|just|up to|at least|"
                   r"at most|more than|less than|fewer than|in|on|at|by|since|from|until|of|the|a|an)\s+",
                   re.IGNORECASE)


def expected_kind(question: str) -> str | None:
    """'quantity', 'date', 'name' or 'called' ("What is X called?") when the question's form asks
    for one, else None."""
    for pattern, kind in _ASKS:
        if pattern.search(question):
            return kind
    return None


def typed_spans(text: str, kind: str, asked: set[str] = frozenset(), count: bool = False) -> list[tuple[int, int]]:
    """(start, end) of each span of `text` of the kind: numbers with the word after them as a unit
    (two when the second is capitalised: "80 degrees Celsius"; not a function word, nor a word of
    the question, `asked`, stemmed: "12" for "How many nurses ...?"), dates and years, or
    capitalised names (never a date or a number word), or what follows "called", "named" or "known
    as"; in order. A quantity is never a date or a year; with `count` (the question asks "how
    many") it comes without a unit."""
    from bm25s.stopwords import STOPWORDS_EN_PLUS as STOPWORDS_EN

    cjk = bool(_CJK.search(text))
    spans: list[tuple[int, int]] = []
    if kind == "date":
        for m in (_DATE_CJK if cjk else _DATE_EN).finditer(text):
            spans.append(m.span())
    elif kind == "quantity":
        if cjk:
            spans = [m.span() for m in _QUANTITY_CJK.finditer(text) if any(c.isdigit() or c in "一二三四五六七八九十百千万两" for c in m.group())]
        for m in _QUANTITY_EN.finditer(text):
            a, b = m.span()
            if cjk and any(a < e and s < b for s, e in spans):
                continue
            if cjk:
                spans.append((a, b))
                continue
            compound = re.match(r"(?:-[A-Za-z]+)+\b", text[b:])  # "eight-year-old"
            unit = re.match(r"\s?(?!(?:and|or|to)\b)([A-Za-z][\w°]*)(?:\s([A-Z][a-z]+))?", text[b:])
            if compound:
                b += compound.end()
            elif unit and count:
                pass  # "How many sacks ...?": the count alone, its noun is the question's
            elif unit and unit.group(1).lower() not in STOPWORDS_EN and unit.group(1).lower() not in _NOT_UNITS \
                    and not _terms(unit.group(1)) & asked:
                b += len(unit.group(0)) if unit.group(2) else unit.end(1)
            spans.append((a, b))
        dates = [m.span() for m in (_DATE_CJK if cjk else _DATE_EN).finditer(text)]
        spans = [(a, b) for a, b in spans if not any(a < e and s < b for s, e in dates)]
    elif kind == "called" and not cjk:  # "The compiler is called rustc."
        for m in _CALLED.finditer(text):
            spans.append(m.span(1))
    elif kind == "name" and not cjk:
        stop = set(STOPWORDS_EN)
        for m in _NAME.finditer(text):
            a, b = m.span()
            words = m.group().split()
            while words and words[0].lower() in stop:  # "The", "In" starting a sentence
                a = text.index(words[1], a + len(words[0])) if len(words) > 1 else b
                words = words[1:]
            if words and not re.fullmatch(_NUMBER_WORDS, words[0].lower()):
                spans.append((a, b))
        dates = [m.span() for m in _DATE_EN.finditer(text)]
        spans = [(a, b) for a, b in spans if not any(a < e and s < b for s, e in dates)]
    return sorted(set(spans))


@dataclass
class Typed:
    passage: int
    start: int
    end: int
    text: str


def _terms(text: str) -> set[str]:
    return set(terms(text))


def typed_answer(question: str, passages: list[str], said: str | None = None) -> Typed | None:
    """The span of the asked kind in the best sentence holding one (see the module), or None when
    the question asks for no kind or no sentence with such a span holds at least MIN_SHARE of the
    question's words (by weight) that the best sentence holds. `said` is
    the model's own (short) answer: it is kept when it is one of that sentence's spans. A Chinese
    or Japanese question asking which, where, what or who is answered by alignment (`aligned_cjk`)."""
    kind = expected_kind(question)
    if kind is None:
        return aligned_cjk(question, passages)
    asked = question_terms(question) or _terms(question)
    if not asked:
        return None
    sentences = []  # (passage, start, end, terms)
    for i, text in enumerate(passages):
        pos = 0
        for m in [*_BREAK.finditer(text), None]:
            end = m.start() if m else len(text)
            if text[pos:end].strip():
                sentences.append((i, pos, end, _terms(text[pos:end])))
            pos = m.end() if m else end
    if not sentences:
        return None
    n = len(sentences)
    idf = {t: math.log(1 + n / (1 + sum(t in s[3] for s in sentences))) for t in asked}
    q_norm = set(normalize_answer(question).split())
    said_norm = normalize_answer(said) if said else ""

    top = max(sum(idf[t] for t in s[3] & asked) for s in sentences)
    best = None  # (score, Typed)
    for i, a, b, words in sentences:
        held = words & asked
        score = sum(idf[t] for t in held)
        if score <= 0 or score < MIN_SHARE * top or (best is not None and score <= best[0]):
            continue
        text = passages[i][a:b]
        spans = []
        for s, e in typed_spans(text, kind, asked, count=bool(_COUNT.search(question))):
            piece = text[s:e].strip()
            lead = _LEAD.match(piece)
            if lead and len(piece) > lead.end():
                s += len(text[s:e]) - len(text[s:e].lstrip()) + lead.end()
                piece = text[s:e].strip()
            tokens = normalize_answer(piece).split()
            if not tokens or set(tokens) <= q_norm or _terms(piece) and _terms(piece) <= asked:
                continue  # what the question already says ("Rust" for "Who started Rust?")
            spans.append((s, e, piece))
        if not spans:
            continue
        chosen = None
        if said_norm:
            chosen = next((sp for sp in spans if normalize_answer(sp[2]) == said_norm), None)
        if chosen is None:
            chosen = min(spans, key=lambda sp: (_distance(text, sp, held), -len(sp[2].split()), sp[0]))
        s, e, piece = chosen
        best = (score, Typed(i, a + s, a + s + len(piece), piece))
    return best[1] if best else None


_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_]+")


def _distance(text: str, span: tuple[int, int, str], held: set[str]) -> int:
    """How far the span is from the question's words in its sentence: for each word the sentence
    shares with the question, the words (CJK: characters) between the span and its nearest
    occurrence, summed. CJK text is matched by its character pairs."""
    s, e = span[0], span[1]
    toks = list(_TOKEN.finditer(text))
    inside = [k for k, m in enumerate(toks) if m.start() < e and m.end() > s]
    if not inside:
        return 1 << 20
    lo, hi = inside[0], inside[-1]
    pairs = {t for t in held if len(t) >= 2 and _CJK.search(t)}
    nearest: dict[str, int] = {}
    for k, m in enumerate(toks):
        if lo <= k <= hi:
            continue
        word = m.group()
        if _CJK.match(word):
            found = {word + toks[k + 1].group()} if k + 1 < len(toks) and toks[k + 1].start() == m.end() else set()
            found = found & pairs if pairs else {word} & held
        else:
            found = set(terms(word)) & held
        for t in found:
            gap = lo - k if k < lo else k - hi
            nearest[t] = min(nearest.get(t, gap), gap)
    return sum(nearest.values()) if nearest else 1 << 20


# "哪个朝代", "哪些省份", "哪里", "什么", "谁": the words of a CJK question that stand for its answer
_CJK_WH = re.compile(r"哪(?:个|些|一|位|种|家|所|座|条|里|儿)?|什么|谁")
_CJK_STOP = re.compile(r"[。！？；!?;\n]")
_CJK_CLAUSE_END = re.compile(r"[，,：:。！？；!?;\n]")


def aligned_cjk(question: str, passages: list[str]) -> Typed | None:
    """A CJK question is often its sentence with the answer replaced by a question word:
    "长城东起哪里？" and "长城东起山海关，西至嘉峪关。". The answer is what lies in the sentence between the
    longest end of the question's text before the question word ("东起") and the question's text
    after it ("发射" in "在哪里发射": its last occurrence in the clause), or the clause's end; the noun
    after "哪个" may be left out ("哪个朝代": "明朝"). Of the sentences, the one matching the most
    characters of the question that way; None when none matches two or more."""
    m = _CJK_WH.search(question)
    if m is None or not _CJK.search(question):
        return None
    pre = question[: m.start()].strip()
    post = re.sub(r"[？?。！!\s]+$", "", question[m.end():])
    best = None  # (matched characters, Typed)
    for i, text in enumerate(passages):
        pos = 0
        for stop in [*_CJK_STOP.finditer(text), None]:
            end = stop.start() if stop else len(text)
            found = _align(text[pos:end], pre, post)
            if found and (best is None or found[0] > best[0]):
                n, a, b = found
                best = (n, Typed(i, pos + a, pos + b, text[pos + a : pos + b]))
            pos = stop.end() if stop else end
    return best[1] if best and best[0] >= 2 else None


def _align(sentence: str, pre: str, post: str) -> tuple[int, int, int] | None:
    """(characters matched, start, end) of the answer in one sentence, or None."""
    for n in range(len(pre), 0, -1):
        i = sentence.find(pre[-n:])
        if i >= 0:
            break
    else:
        return None
    start = i + n
    clause = _CJK_CLAUSE_END.search(sentence, start)
    limit = clause.start() if clause else len(sentence)
    for k in range(len(post)):  # the question's text after the answer, or its end ("朝代" left out)
        j = sentence.rfind(post[k:], start + 1, limit)
        if post[k:] and j > start:
            return n + len(post) - k, start, j
    if limit - start > 0:
        return n, start, limit
    return None
