"""Text out of the file formats documents come in: plain text in any common encoding, PDF, HTML
and DOCX. Each reader returns the text the rest of QA sees (evidence offsets index into it) and
raises InputError with one line naming the file when it cannot.

Headings found in HTML and DOCX are written as Markdown headings ("## Title") so retrieval keeps
the heading path of every chunk, whatever format the document came in.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path

from ..errors import InputError

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".text")
HTML_SUFFIXES = (".html", ".htm", ".xhtml")
SUFFIXES = TEXT_SUFFIXES + HTML_SUFFIXES + (".pdf", ".docx")
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_BLANKS = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
_SPACES = re.compile(r"[ \t\u00a0]+")


def decode_text(data: bytes, source: str) -> str:
    """The text of a file's bytes: a BOM names the encoding (UTF-8/16/32), else UTF-8, else the
    encoding charset-normalizer detects (Latin-1, Windows-1252, ...); InputError for binary data."""
    text = None
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                text = data.decode(encoding)
            except UnicodeDecodeError:
                raise InputError(f"{source} starts with a {encoding.upper()} byte-order mark but is not "
                                 f"{encoding.upper()} text") from None
            break
    if text is None:
        if b"\x00" in data[:65536]:
            raise InputError(f"{source} is a binary file, not text")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = _detected(data, source)
    if _looks_binary(text):
        raise InputError(f"{source} is a binary file, not text")
    return text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")


def _detected(data: bytes, source: str) -> str:
    from charset_normalizer import from_bytes

    matches = from_bytes(data[:1_000_000])
    best = matches.best()
    if best is None or best.encoding is None:
        raise InputError(f"{source} is a binary file, not text")
    # Western European text fits several single-byte code pages equally well; like web browsers,
    # prefer Windows-1252 (a superset of Latin-1's printable range) when it is as good as the best
    western = [m for m in matches if m.encoding == "cp1252" and m.chaos <= best.chaos + 0.05]
    if western:
        best = western[0]
    try:
        return data.decode(best.encoding)
    except (UnicodeDecodeError, LookupError):
        raise InputError(f"{source} is not text in any encoding found ({best.encoding}?)") from None


def _looks_binary(text: str) -> bool:
    head = text[:65536]
    controls = sum(1 for c in head if (ord(c) < 32 and c not in "\t\n\r\f\v") or 0x7F <= ord(c) < 0xA0)
    return controls > max(8, len(head) // 100)


def tidy(text: str) -> str:
    """Extracted text with runs of spaces collapsed, at most one blank line between paragraphs."""
    lines = [_SPACES.sub(" ", line).strip() for line in text.replace("\r\n", "\n").split("\n")]
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


def read_pdf(path: Path, data: bytes) -> str:
    """Page texts from pypdf, a blank line between pages. Encrypted PDFs open only without a password;
    a PDF with pages but no text (scanned images) is refused."""
    import io
    import logging

    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                ok = reader.decrypt("")
            except Exception:
                ok = 0
            if not ok:
                raise InputError(f"{path} is an encrypted PDF (password protected): decrypt it first")
        pages = [page.extract_text() or "" for page in reader.pages]
    except InputError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError, RecursionError) as e:
        raise InputError(f"{path} is not a readable PDF ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'damaged'})") from None
    text = "\n\n".join(tidy(p) for p in pages if p.strip())
    if not text.strip():
        what = f"its {len(pages)} page(s) hold" if pages else "it holds"
        raise InputError(f"{path} has no text layer: {what} no extractable text (scanned images? run OCR first)")
    return text


def read_html(path: Path, data: bytes) -> str:
    """The visible text of an HTML page (BeautifulSoup, the standard library's parser): no scripts,
    styles or navigation; headings as Markdown headings, blocks as paragraphs."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(data, "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "head", "nav", "svg", "iframe", "form"]):
        tag.decompose()
    for level in range(1, 7):
        for h in soup.find_all(f"h{level}"):
            title = " ".join(h.get_text(" ").split())
            h.replace_with(f"\n\n{'#' * level} {title}\n\n" if title else "")
    for tag in soup.find_all(["p", "div", "li", "tr", "pre", "blockquote", "section", "article", "table",
                              "ul", "ol", "dd", "dt", "br", "figcaption"]):
        tag.insert_before("\n\n" if tag.name != "br" else "\n")
    text = tidy(soup.get_text(""))
    if not text:
        raise InputError(f"{path} is an HTML page with no visible text")
    return text


def read_docx(path: Path, data: bytes) -> str:
    """Paragraphs and table rows of a Word document (python-docx); 'Heading N' styles as headings."""
    import io
    import zipfile

    import docx

    try:
        document = docx.Document(io.BytesIO(data))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as e:
        raise InputError(f"{path} is not a readable DOCX file ({type(e).__name__})") from None
    except Exception as e:  # python-docx raises its own types for a package without a document part
        raise InputError(f"{path} is not a readable DOCX file ({type(e).__name__})") from None
    blocks = []
    for para in document.paragraphs:
        text = " ".join(para.text.split())
        if not text:
            continue
        style = (para.style.name if para.style is not None else "") or ""
        m = re.match(r"Heading (\d)", style)
        level = int(m.group(1)) if m else (1 if style == "Title" else 0)
        blocks.append(f"{'#' * level} {text}" if level else text)
    for table in document.tables:
        for row in table.rows:
            cells = [" ".join(c.text.split()) for c in row.cells]
            if any(cells):
                blocks.append(" | ".join(cells))
    text = "\n\n".join(blocks)
    if not text:
        raise InputError(f"{path} is a DOCX file with no text")
    return text


def extract(path: Path, data: bytes) -> str:
    """The text of one file, by its suffix (anything else is read as text)."""
    suffix = path.suffix.lower()
    if suffix == ".pdf" or data.startswith(b"%PDF-"):
        return read_pdf(path, data)
    if suffix == ".docx":
        return read_docx(path, data)
    if suffix in HTML_SUFFIXES:
        return read_html(path, decode_text(data, str(path)).encode("utf-8"))
    return decode_text(data, str(path))
