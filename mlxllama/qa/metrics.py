"""SQuAD-style scoring and the dev-set evaluation behind `mlxllama eval-qa`.

Normalisation is SQuAD's (lower case, no punctuation, no English articles, single spaces), with one
addition for Chinese and Japanese: CJK characters count as separate tokens, so F1 gives partial
credit for text written without spaces. SQuAD 2.0 conventions for unanswerable items: an item with
no gold answers scores 1 (EM and F1) exactly when the prediction is "no answer".
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

_PUNCT = set(string.punctuation) | set("，。！？；：、“”‘’（）《》【】—…·「」")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff])")


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    return _CJK.sub(r" \1 ", normalize_answer(text)).split()


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    pred, ref = answer_tokens(prediction), answer_tokens(gold)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def score_item(prediction: str, no_answer: bool, answers: list[str]) -> tuple[float, float]:
    """(EM, F1) of one prediction against its gold answers (the best over them)."""
    if not answers:
        return (float(no_answer),) * 2
    if no_answer:
        return 0.0, 0.0
    return max(exact_match(prediction, a) for a in answers), max(f1_score(prediction, a) for a in answers)


def read_dataset(path: str | Path) -> list[dict]:
    """A JSONL file of {id, context, question, answers: [...]} ([] when unanswerable); `context` is a
    text or {file name: text} for several documents; an optional `split` names the item's split."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"dataset not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read dataset {path}: {e}") from None
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not JSON ({e.msg})") from None
        context = item.get("context") if isinstance(item, dict) else None
        several = isinstance(context, dict) and context and all(isinstance(v, str) for v in context.values())
        if not isinstance(item, dict) or not (isinstance(context, str) or several) \
                or not isinstance(item.get("question"), str) or not isinstance(item.get("answers"), list):
            raise InputError(f"{path}:{n}: needs a 'context' (text, or {{file name: text}}), a string "
                             "'question' and a list 'answers'")
        item.setdefault("id", str(n))
        items.append(item)
    if not items:
        raise InputError(f"dataset {path} has no items")
    return items


@dataclass
class Report:
    items: int = 0
    exact_match: float = 0.0  # percent, over all items
    f1: float = 0.0
    has_answer_em: float = 0.0
    has_answer_f1: float = 0.0
    no_answer_accuracy: float = 0.0  # percent of unanswerable items answered "no answer"
    false_no_answer: float = 0.0  # percent of answerable items wrongly answered "no answer"
    answers_per_second: float = 0.0
    seconds: float = 0.0
    predictions: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in self.__dict__.items() if k != "predictions"}


def summarize(preds: list[dict], seconds: float) -> Report:
    n = len(preds)
    answerable = [p for p in preds if p["answers"]]
    unanswerable = [p for p in preds if not p["answers"]]

    def pct(values) -> float:
        values = list(values)
        return 100.0 * sum(values) / len(values) if values else 0.0

    return Report(
        items=n,
        exact_match=pct(p["em"] for p in preds),
        f1=pct(p["f1"] for p in preds),
        has_answer_em=pct(p["em"] for p in answerable),
        has_answer_f1=pct(p["f1"] for p in answerable),
        no_answer_accuracy=pct(p["no_answer"] for p in unanswerable),
        false_no_answer=pct(p["no_answer"] for p in answerable),
        answers_per_second=n / seconds if seconds > 0 else 0.0,
        seconds=seconds,
        predictions=preds,
    )
