"""Where a context comes from: text, files (text, PDF, HTML, DOCX), folders of them, or stdin.

Every document keeps its source (a path, "<stdin>" or "<context>") so that answers can cite the
file and the character offsets of their evidence.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

from ..errors import InputError
from .formats import SUFFIXES, decode_text, extract

MAX_CONTEXT_CHARS = 20_000_000  # beyond this even retrieval refuses: one clear line instead


@dataclass(frozen=True)
class Document:
    source: str  # file path, "<stdin>" or "<context>"
    text: str


ContextLike = Union[str, Document, Sequence[Union[str, Document]], Mapping[str, str]]


def read_file(path: Path) -> Document:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"context file not found: {path}") from None
    except PermissionError:
        raise InputError(f"cannot read context file {path}: permission denied") from None
    except OSError as e:
        raise InputError(f"cannot read context file {path}: {e.strerror or e}") from None
    return Document(str(path), extract(path, data))


def folder_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise InputError(f"no documents in folder {folder} (looked for {', '.join(SUFFIXES)})")
    return files


def read_context(paths: Iterable[str | os.PathLike], stdin=None) -> list[Document]:
    """Documents from files, folders (every document file in them, recursively) and '-' (stdin)."""
    docs: list[Document] = []
    for item in paths:
        if str(item) == "-":
            stream = stdin
            if stream is None:
                import sys

                stream = sys.stdin
            raw = stream.buffer.read() if hasattr(stream, "buffer") else stream.read()
            text = decode_text(raw, "<stdin>") if isinstance(raw, bytes) else raw
            docs.append(Document("<stdin>", text))
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            docs.extend(read_file(p) for p in folder_files(path))
        elif path.exists():
            docs.append(read_file(path))
        else:
            raise InputError(f"context file not found: {path}")
    return check_documents(docs)


def as_documents(context: ContextLike) -> list[Document]:
    """The API's context argument: a string, Documents, a list of strings, or {source: text}."""
    if isinstance(context, (str, Document)):
        items: list = [context]
    elif isinstance(context, Mapping):
        items = [Document(str(k), v) for k, v in context.items()]
    else:
        items = list(context)
    docs = []
    for i, item in enumerate(items):
        if isinstance(item, Document):
            docs.append(item)
        elif isinstance(item, str):
            docs.append(Document("<context>" if len(items) == 1 else f"<context {i + 1}>", item))
        else:
            raise InputError(f"context items must be strings or Documents, got {type(item).__name__}")
    return check_documents(docs)


def check_documents(docs: list[Document], max_chars: int = MAX_CONTEXT_CHARS) -> list[Document]:
    """Drops empty documents; InputError when nothing is left or when there is too much."""
    kept = [d for d in docs if d.text.strip()]
    if not kept:
        named = [d.source for d in docs if not d.source.startswith("<")]
        raise InputError("the context is empty" + (f" ({', '.join(named[:3])}: no text)" if named else ""))
    docs = kept
    total = sum(len(d.text) for d in docs)
    if total > max_chars:
        raise InputError(f"the context is {total:,} characters, more than the limit of {max_chars:,} "
                         "even with retrieval; split it or pass fewer files")
    return docs
