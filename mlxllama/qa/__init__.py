"""Question answering over the user's documents.

context.py   where text comes from (files, folders, stdin) and what is refused
formats.py   text out of files: any common text encoding, PDF, HTML, DOCX
retrieve.py  section chunks with offsets and heading paths, stemmed BM25 ranking
rerank.py    the model's query likelihood over the best candidates, one batched pass
prompt.py    the prompt (documents before the question) and the no-answer phrase
span.py      the extractive decoding constraint (answers are spans of the context)
session.py   answer() and QASession (document KV cache reused across questions)
metrics.py   SQuAD exact match / F1 and the eval-qa loop
"""

from .context import Document, read_context
from .prompt import NO_ANSWER
from .session import Answer, QASession, answer

__all__ = ["Answer", "Document", "NO_ANSWER", "QASession", "answer", "read_context"]
