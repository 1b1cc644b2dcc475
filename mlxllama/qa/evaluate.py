"""eval-qa: answer every item of a question set and score it (the scoring itself is metrics.py)."""

from __future__ import annotations

import time
from typing import Callable

from .metrics import Report, score_item, summarize
from .session import QASession


def evaluate(model, tokenizer, items: list[dict], *, progress: Callable[[int, dict], None] | None = None,
             **qa_kwargs) -> Report:
    """Answers every item (items with the same context in a row share one QASession, so the
    document cache is reused) and scores them."""
    preds, session, session_context = [], None, None
    tic = time.perf_counter()
    for i, item in enumerate(items):
        if session is None or item["context"] != session_context:
            session = QASession(model, tokenizer, item["context"], **qa_kwargs)
            session_context = item["context"]
        result = session.ask(item["question"])
        em, f1 = score_item(result.answer, result.no_answer, item["answers"])
        pred = {"id": item["id"], "question": item["question"], "prediction": result.answer,
                "no_answer": result.no_answer, "answers": item["answers"], "em": em, "f1": f1,
                "score": round(result.score, 4), "margin": result.margin, "coverage": result.coverage,
                "confidence": result.confidence, "seconds": round(result.seconds, 3),
                "sentence": result.sentence, "evidence": result.evidence, "chunks": result.chunks}
        preds.append(pred)
        if progress:
            progress(i, pred)
    seconds = time.perf_counter() - tic
    return summarize(preds, seconds)
