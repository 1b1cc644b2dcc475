"""POST /v1/qa: questions about documents sent in the request, answered with their evidence.

Request:  {"documents": [{"name", "text"}], "question", "extractive"?, "max_tokens"?, "top_chunks"?,
           "max_context"?, "temperature"?, "seed"?, "no_answer_threshold"? (number, "auto" or "off")}
Response: {"object": "qa.answer", "model", "question", "answer", "no_answer", "evidence": {source,
           start, end, text} | null, "chunks": [{source, start, end, score}], "score", "extractive",
           "usage": {prompt_tokens, completion_tokens}, "seconds"}

Offsets count characters (code points) of the text exactly as sent. The same checks as
`mlxllama qa` apply (binary text, empty context, size limits, empty question) and come back as
OpenAI error bodies. Questions run one at a time on their own thread (the chat engine keeps its
own); the last documents' session is kept, so follow-up questions reuse its document KV cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import InputError
from ..generation_options import OPTIONS as GENERATION
from .schemas import APIError, bad

MAX_DOCUMENTS = 64
MAX_NAME_CHARS = 256
MAX_QUESTION_CHARS = 4096
MAX_WAITING = 4  # questions waiting for the one running; beyond: 429
OPTIONS = {  # field: (type check, description, QASession keyword)
    "extractive": (lambda v: isinstance(v, bool), "a boolean", "extractive"),
    "max_tokens": (lambda v: _int(v) and v >= 1, "an integer >= 1", "max_tokens"),
    "top_chunks": (lambda v: _int(v) and v >= 1, "an integer >= 1", "top_chunks"),
    "max_context": (lambda v: _int(v) and v >= 32, "an integer >= 32", "max_context"),
    "temperature": (lambda v: _num(v) and v in GENERATION["temp"].request_range,
                    f"a number {GENERATION['temp'].request_range.text()}", "temp"),
    "seed": (lambda v: _int(v) and abs(v) < 1 << 63, "an integer", "seed"),
}


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return (_int(v) or isinstance(v, float)) and math.isfinite(v)


def parse_documents(value: Any) -> list:
    from ..qa.context import Document, decode_text

    if not isinstance(value, list) or not value:
        raise bad("documents", "'documents' must be a non-empty list of {name, text}")
    if len(value) > MAX_DOCUMENTS:
        raise bad("documents", f"at most {MAX_DOCUMENTS} documents per question, got {len(value)}")
    docs, names = [], set()
    for i, item in enumerate(value):
        where = f"documents[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise bad(where, f"'{where}' must be an object with a string 'text'")
        name = item.get("name", f"document {i + 1}")
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS:
            raise bad(f"{where}.name", f"'{where}.name' must be a non-empty string of at most {MAX_NAME_CHARS} characters")
        if name in names:
            raise bad(f"{where}.name", f"two documents are named {name!r}: names must be unique (answers cite them)")
        names.add(name)
        try:  # the CLI's checks for text files; the text itself is kept as sent, so offsets index it
            decode_text(item["text"].encode("utf-8"), name)
        except UnicodeEncodeError:
            raise bad(f"{where}.text", f"{name} contains unpaired surrogates, not text") from None
        except InputError as e:
            raise bad(f"{where}.text", str(e)) from None
        docs.append(Document(name, item["text"]))
    return docs


def parse_qa(body: Any) -> tuple[list, str, dict]:
    """(documents, question, QASession keyword arguments) of a request body, or APIError."""
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object")
    docs = parse_documents(body.get("documents"))
    question = body.get("question")
    if not isinstance(question, str) or not question.strip():
        raise bad("question", "the question is empty")
    if len(question) > MAX_QUESTION_CHARS:
        raise bad("question", f"the question is longer than {MAX_QUESTION_CHARS} characters")
    kwargs: dict[str, Any] = {}
    for name, (ok, what, keyword) in OPTIONS.items():
        if body.get(name) is not None:
            if not ok(body[name]):
                raise bad(name, f"'{name}' must be {what}")
            kwargs[keyword] = body[name]
    threshold = body.get("no_answer_threshold", "auto")
    if threshold not in ("auto", "off", None) and not _num(threshold):
        raise bad("no_answer_threshold", "'no_answer_threshold' must be a number, 'auto' or 'off'")
    kwargs["no_answer_threshold"] = None if threshold == "off" else "auto" if threshold is None else threshold
    return docs, question.strip(), kwargs


def answer_body(result, model_id: str) -> dict[str, Any]:
    """The response for an Answer (fields read with defaults, so a richer Answer still fits)."""
    get = lambda name, default=None: getattr(result, name, default)  # noqa: E731
    return {
        "object": "qa.answer", "model": model_id, "question": get("question", ""), "answer": get("answer", ""),
        "no_answer": bool(get("no_answer", False)), "evidence": get("evidence"), "chunks": list(get("chunks") or []),
        "score": float(get("score", 0.0) or 0.0), "extractive": bool(get("extractive", False)),
        "usage": {"prompt_tokens": int(get("prompt_tokens", 0) or 0),
                  "completion_tokens": int(get("generation_tokens", 0) or 0)},
        "seconds": round(float(get("seconds", 0.0) or 0.0), 4),
    }


class QARoute:
    """The handler of POST /v1/qa, sharing the server's key check, body limit and model."""

    def __init__(self, handlers):
        self.h = handlers
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlxllama-qa")
        self.waiting = 0
        self.session = None  # (key, QASession) of the last documents and options
        self.lock = threading.Lock()

    async def handle(self, request):
        from starlette.responses import JSONResponse

        self.h.check_key(request)
        docs, question, kwargs = parse_qa(await self.h.read_json(request))
        if self.waiting > MAX_WAITING:
            raise APIError(429, "The server is busy answering other questions", code="rate_limit_exceeded",
                           type="requests")
        self.waiting += 1
        try:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self.executor, self.ask, docs, question, kwargs)
        finally:
            self.waiting -= 1
        return JSONResponse(answer_body(result, self.h.settings.model_id))

    def ask(self, docs: list, question: str, kwargs: dict):
        from ..qa import QASession

        digest = hashlib.sha256()
        for d in docs:
            digest.update(f"{len(d.source)}:{d.source}{len(d.text)}:".encode())
            digest.update(d.text.encode("utf-8"))
        key = (digest.hexdigest(), tuple(sorted(kwargs.items())))
        try:
            with self.lock:
                if self.session is None or self.session[0] != key:
                    self.session = None  # free the old document cache first
                    self.session = (key, QASession(self.h.model, self.h.tokenizer, docs, **kwargs))
                return self.session[1].ask(question)
        except InputError as e:
            message = str(e)
            param = "question" if "question" in message else "documents" if "context" in message else None
            raise bad(param, message) from None

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
