"""QA inputs: PDF, HTML, DOCX and text in other encodings read into text with exact offsets; bad
files (encrypted or scanned PDF, empty, binary) refused in one line naming the file."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from mlxllama.errors import InputError
from mlxllama.qa import read_context
from mlxllama.qa.formats import decode_text

SENTENCE = "The vault access code is 7319 and Priya Raman chose it."


def minimal_pdf(pages: list[str]) -> bytes:
    """A PDF with one line of Helvetica text per page (an empty string: a page without text)."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", None, "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET" if text else ""
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
        content = len(objects)
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {content} 0 R "
                       "/Resources << /Font << /F1 3 0 R >> >> >>")
        kids.append(f"{len(objects)} 0 R")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out, offsets = b"%PDF-1.4\n", []
    for i, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{obj}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def encrypted_pdf() -> bytes:
    from pypdf import PdfWriter

    writer = PdfWriter()
    writer.add_blank_page(200, 200)
    writer.encrypt("secret")
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


def docx_bytes(tmp_path) -> bytes:
    import docx

    d = docx.Document()
    d.add_heading("Security", level=1)
    d.add_paragraph("Badges are worn at all times.")
    d.add_heading("Vault", level=2)
    d.add_paragraph(SENTENCE)
    path = tmp_path / "made.docx"
    d.save(path)
    data = path.read_bytes()
    path.unlink()
    return data


HTML = (f"<html><head><title>t</title><style>p {{color: red}}</style><script>var x = 'no';</script></head>"
        f"<body><nav>Home | About</nav><h1>Security</h1><p>Badges are worn.</p><h2>Vault</h2>"
        f"<p>{SENTENCE.replace('Priya Raman', '<b>Priya Raman</b>')}</p></body></html>")


@pytest.mark.parametrize("name,make,heading", [
    ("doc.pdf", lambda tmp: minimal_pdf(["Cover page", SENTENCE]), None),
    ("page.html", lambda tmp: HTML.encode(), "## Vault"),
    ("doc.docx", docx_bytes, "## Vault"),
    ("bom8.txt", lambda tmp: b"\xef\xbb\xbf" + SENTENCE.encode(), None),
    ("bom16.txt", lambda tmp: ("\ufeff" + SENTENCE).encode("utf-16-le"), None),
    ("bom16be.md", lambda tmp: "\ufeff".encode("utf-16-be") + SENTENCE.encode("utf-16-be"), None),
])
def test_formats_round_trip_a_sentence_with_offsets(tmp_path, name, make, heading):
    path = tmp_path / name
    path.write_bytes(make(tmp_path))
    (doc,) = read_context([path])
    start = doc.text.index(SENTENCE)
    assert doc.text[start : start + len(SENTENCE)] == SENTENCE and doc.source == str(path)
    assert "\ufeff" not in doc.text and "var x" not in doc.text and "color" not in doc.text
    if heading:
        assert heading in doc.text and doc.text.index(heading) < start


def test_latin1_and_windows_1252_are_detected(tmp_path):
    text = ("Le café crème coûte trois euros à la brasserie près de la gare, où l'été dernier "
            "les élèves ont fêté la fin de l'année scolaire avec leurs professeurs. ") * 3
    for encoding in ("latin-1", "cp1252"):
        body = text + ("Prix : 5 € — « spécial »." if encoding == "cp1252" else "")
        path = tmp_path / f"{encoding}.txt"
        path.write_bytes(body.encode(encoding))
        assert read_context([path])[0].text == body


def test_a_folder_walks_every_format(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.pdf").write_bytes(minimal_pdf([SENTENCE]))
    (tmp_path / "sub" / "c.html").write_text(HTML)
    (tmp_path / "sub" / "d.docx").write_bytes(docx_bytes(tmp_path / "sub"))
    (tmp_path / "image.png").write_bytes(b"\x89PNG\x00")
    names = [d.source.split("/")[-1] for d in read_context([tmp_path])]
    assert names == ["a.txt", "b.pdf", "c.html", "d.docx"]


@pytest.mark.parametrize("name,data,message", [
    ("locked.pdf", encrypted_pdf, "is an encrypted PDF"),
    ("scan.pdf", lambda: minimal_pdf(["", ""]), "has no text layer"),
    ("broken.pdf", lambda: b"%PDF-1.4\n garbage", "is not a readable PDF"),
    ("empty.pdf", lambda: b"", "is not a readable PDF"),
    ("broken.docx", lambda: b"PK\x03\x04 not a zip", "is not a readable DOCX"),
    ("empty.txt", lambda: b"", "the context is empty"),
    ("data.bin", lambda: bytes(range(256)) * 8, "is a binary file"),
    ("noise.txt", lambda: bytes((i * 97 + 13) % 256 for i in range(4096)).replace(b"\x00", b"\x01"), "binary file"),
    ("bad16.txt", lambda: b"\xff\xfe" + b"\x00\xd8", "byte-order mark"),
])
def test_bad_files_give_one_line_naming_the_file(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data())
    with pytest.raises(InputError, match=message) as e:
        read_context([path])
    assert "\n" not in str(e.value)
    if message != "the context is empty":
        assert str(path) in str(e.value)


def test_cli_refuses_an_encrypted_pdf_in_one_line(tmp_path):
    path = tmp_path / "locked.pdf"
    path.write_bytes(encrypted_pdf())
    r = subprocess.run([sys.executable, "-m", "mlxllama", "qa", "--context", str(path), "Q?"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: ") and str(path) in r.stderr and "encrypted" in r.stderr


def test_decode_text_keeps_plain_utf8():
    assert decode_text("naïve 北京\r\nline".encode(), "x") == "naïve 北京\nline"


@pytest.mark.parametrize("suffix", [".txt", ".pdf", ".html", ".docx"])
def test_random_bytes_give_text_or_one_line(tmp_path, suffix):
    """Whatever the bytes, a reader returns text or raises InputError with one line naming the file."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from mlxllama.qa.formats import extract

    path = tmp_path / f"fuzz{suffix}"
    prefix = {".pdf": b"%PDF-1.4\n", ".docx": b"PK\x03\x04"}.get(suffix, b"")

    @settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.binary(max_size=600))
    def check(data):
        try:
            text = extract(path, prefix + data)
        except InputError as e:
            assert "\n" not in str(e) and str(path) in str(e)
        else:
            assert isinstance(text, str)

    check()
