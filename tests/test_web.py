"""The chat page at / in a real browser (Playwright driving the system's chromium), against live
servers, and the /v1/qa route it uses."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import re
from pathlib import Path

import mlxllama  # noqa: I001  (first: it loads the optimized BLAS before mlx.core)

import httpx
import pytest

from mlxllama.serve import create_app
from test_serve import LiveServer, tiny_dir  # noqa: F401  (tiny_dir: a fixture)

CHROMIUM = shutil.which("chromium")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"]
MODEL_ID = "tiny-web"
KEY = "web-key"
STATIC = Path(mlxllama.__file__).parent / "serve" / "static"
NOTES = ("# Harbor notes 🚢\n\nThe café opened in 1987. 🍰 Harbor Goods was founded by Ana Ruiz in Leeds.\n\n"
         "Its second warehouse followed in Bristol in 1994.\n")


@pytest.fixture(scope="module")
def server(tiny_dir):  # noqa: F811
    model, tokenizer = mlxllama.load(tiny_dir)
    with LiveServer(create_app(model, tokenizer, MODEL_ID, max_batch=2, default_temperature=0.0)) as live:
        yield live


@pytest.fixture(scope="module")
def keyed(tiny_dir):  # noqa: F811
    model, tokenizer = mlxllama.load(tiny_dir)
    with LiveServer(create_app(model, tokenizer, MODEL_ID, api_key=KEY, default_temperature=0.0)) as live:
        yield live


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


class Page:
    """A fresh browser context (its own localStorage) that records console errors."""

    def __init__(self, browser):
        self.context = browser.new_context(viewport={"width": 1200, "height": 800})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def open(self, url: str):
        self.page.goto(url)
        return self.page


@pytest.fixture
def web(browser):
    p = Page(browser)
    yield p
    p.context.close()


def wait_model(page, name=MODEL_ID):
    page.wait_for_function("name => document.getElementById('model-name').textContent === name", arg=name)


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def wait_idle(page, timeout=120_000):
    page.wait_for_selector("#send:not([hidden])", timeout=timeout)


def settings(page, **values):
    page.click("#settings summary")
    for field, value in values.items():
        page.fill(f"#{field}", str(value))
    page.click("#settings summary")


def health_load(server) -> int:
    return httpx.get(server.url + "/health").json()["load"]


# -- the page and its files --------------------------------------------------------------------


def test_static_files_are_package_data():
    """A non-editable install ships every file of static/ (pyproject's package-data globs), and
    the page loads nothing from elsewhere (no CDN)."""
    import fnmatch

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    globs = json.loads(re.search(r'^"mlxllama\.serve" = (\[.*\])$', pyproject, re.M).group(1))
    files = [p.relative_to(STATIC.parent).as_posix() for p in STATIC.rglob("*") if p.is_file()]
    assert {"static/index.html", "static/app.js", "static/style.css"} <= set(files)
    assert all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files)
    for path in STATIC.iterdir():
        text = path.read_text()
        assert not re.search(r"""(src|href)=["']?(https?:)?//|from\s+["']https?:|url\(\s*["']?https?:|@import""", text), path


def test_page_routes(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    js = httpx.get(server.url + "/static/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert httpx.get(server.url + "/static/../qa_route.py").status_code == 404
    assert httpx.get(server.url + "/static/%2e%2e/qa_route.py").status_code == 404


@needs_browser
def test_page_loads_without_console_errors(web, server):
    page = web.open(server.url)
    wait_model(page)
    for name in ("Message", "Search conversations", "Question"):
        assert page.get_by_label(name, exact=True).count() == 1, name
    page.click("#tab-docs")
    assert page.is_visible("#dropzone") and not page.is_visible("#prompt")
    page.focus("#tab-docs")
    page.keyboard.press("ArrowLeft")  # the tabs answer the keyboard
    assert page.is_visible("#prompt")
    assert web.errors == []


@needs_browser
def test_dark_scheme_and_server_errors_are_shown(browser, server):
    backgrounds = {}
    for scheme in ("light", "dark"):
        context = browser.new_context(color_scheme=scheme)
        page = context.new_page()
        page.goto(server.url)
        wait_model(page)
        backgrounds[scheme] = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
        if scheme == "dark":
            settings(page, **{"max-tokens": 10**7})  # more than the model's window: the server says 400
            send(page, "hello")
            wait_idle(page)
            error = page.locator(".msg.assistant .error").inner_text()
            assert "maximum context length" in error and "\n" not in error, error  # the API's own message
        context.close()
    assert backgrounds["light"] != backgrounds["dark"]


# -- chatting -----------------------------------------------------------------------------------

RECORD_LENGTHS = """() => {
  window.lengths = [];
  new MutationObserver(() => {
    const last = document.querySelector('#messages .msg.assistant:last-child .content');
    if (last) window.lengths.push(last.textContent.length);
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


@needs_browser
def test_chat_streams_stops_and_survives_reload(web, server):
    page = web.open(server.url)
    wait_model(page)
    settings(page, **{"max-tokens": 20000, "temperature": 0})
    page.evaluate(RECORD_LENGTHS)
    send(page, "the cat sat on the mat")
    page.wait_for_function("() => window.lengths.filter((n, i, a) => n > 0 && n !== a[i - 1]).length >= 5",
                           timeout=60_000)
    assert page.is_visible("#stop") and not page.is_visible("#send")
    page.click("#stop")
    wait_idle(page, 10_000)
    grown = page.evaluate("[...new Set(window.lengths)].filter(n => n > 0)")
    assert grown == sorted(grown) and len(grown) >= 5  # token by token, never shrinking
    answer = page.locator(".msg.assistant .content").last.inner_text()
    time.sleep(1.0)
    assert page.locator(".msg.assistant .content").last.inner_text() == answer  # stopped means stopped
    assert "stopped" in page.locator(".msg.assistant .stats").last.inner_text()
    deadline = time.monotonic() + 10
    while health_load(server) and time.monotonic() < deadline:  # the server freed the request
        time.sleep(0.1)
    assert health_load(server) == 0

    page.reload()
    wait_model(page)
    assert page.locator(".msg.user .content").last.inner_text() == "the cat sat on the mat"
    assert page.locator(".msg.assistant .content").last.inner_text() == answer
    assert page.locator(".conv-open[aria-current=true]").inner_text() == "the cat sat on the mat"
    assert page.input_value("#max-tokens") == "20000"  # settings belong to the conversation
    assert web.errors == []


@needs_browser
def test_counts_regenerate_edit_and_conversations(web, server):
    page = web.open(server.url)
    wait_model(page)
    settings(page, **{"max-tokens": 6, "temperature": 0, "system-prompt": "be brief"})
    send(page, "first question")
    wait_idle(page)
    stats = page.locator(".msg.assistant .stats").last.inner_text()
    assert "prompt tokens" in stats and "generated" in stats, stats
    first = page.locator(".msg.assistant .content").last.inner_text()
    page.get_by_role("button", name="Regenerate the answer").click()
    wait_idle(page)
    assert page.locator(".msg.assistant").count() == 1
    assert page.locator(".msg.assistant .content").last.inner_text() == first  # greedy: the same answer
    page.get_by_role("button", name="Edit and resend this message").click()
    page.fill("textarea.edit", "second question, edited")
    page.press("textarea.edit", "Enter")
    wait_idle(page)
    assert page.locator(".msg.user").count() == 1
    assert page.locator(".msg.user .content").inner_text() == "second question, edited"
    # Shift+Enter is a new line, not a send
    page.fill("#prompt", "line one")
    page.press("#prompt", "Shift+Enter")
    page.keyboard.type("line two")
    assert page.locator(".msg.user").count() == 1 and page.input_value("#prompt") == "line one\nline two"
    page.fill("#prompt", "")

    page.click("#new-chat")
    send(page, "another topic entirely")
    wait_idle(page)
    assert page.locator(".conv-open").count() == 2
    page.fill("#search", "edited")
    assert page.locator(".conv-open").all_inner_texts() == ["second question, edited"]
    page.fill("#search", "")
    page.get_by_role("button", name="Rename another topic entirely").click()
    page.fill("input.rename", "Renamed")
    page.press("input.rename", "Enter")
    assert page.inner_text("#chat-title") == "Renamed"
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name="Delete Renamed").click()  # the current one: a new chat takes its place
    assert page.locator(".conv-open").all_inner_texts() == ["New chat", "second question, edited"]
    assert page.locator(".msg").count() == 0
    assert web.errors == []


@needs_browser
def test_markdown_is_rendered_safely(web, server):
    page = web.open(server.url)
    wait_model(page)
    text = ("# Title\n\nSome **bold**, *em* and `code` <img src=x onerror=alert(1)>.\n\n"
            "- one\n- two\n\n```python\nprint('<b>hi</b>')\n```\n\n[ok](https://example.org) [bad](javascript:alert(1))")
    html = page.evaluate("""async (text) => {
        const {renderMarkdown} = await import('/static/markdown.js');
        const div = document.createElement('div');
        renderMarkdown(text, div);
        return div.innerHTML;
    }""", text)
    assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html and "<em>em</em>" in html
    assert "<code>code</code>" in html and "<li>one</li>" in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html and "<img" not in html
    assert "print('&lt;b&gt;hi&lt;/b&gt;')" in html and "Copy" in html
    assert 'href="https://example.org"' in html and 'href="javascript' not in html
    assert web.errors == []


# -- a server with --api-key ------------------------------------------------------------------


@needs_browser
def test_api_key_is_asked_once_then_kept(web, keyed):
    page = web.open(keyed.url)
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#api-key", "wrong")
    page.press("#api-key", "Enter")
    page.wait_for_function("() => document.getElementById('key-error').textContent.includes('refused')")
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    wait_model(page)
    assert not page.is_visible("#key-dialog")
    settings(page, **{"max-tokens": 4})
    send(page, "hello")
    wait_idle(page)
    assert "generated" in page.locator(".msg.assistant .stats").last.inner_text()
    page.reload()
    wait_model(page)
    assert not page.is_visible("#key-dialog")  # kept in the browser
    # a 401 console message from the first /v1/models is the browser reporting the refused key
    assert all("401" in e for e in web.errors), web.errors


# -- documents ------------------------------------------------------------------------------


def add_document(page, name: str, text: str, mime="text/markdown", refused=False):
    page.click("#tab-docs")
    page.set_input_files("#file-input", files=[{"name": name, "mimeType": mime, "buffer": text.encode()}])
    if refused:
        page.wait_for_function("() => document.getElementById('docs-status').textContent.startsWith('Not read')")
    else:
        page.wait_for_selector(f".doc-open:text-is('{name}')")


def ask(page, question: str) -> dict:
    page.fill("#question", question)
    with page.expect_response("**/v1/qa", timeout=180_000) as response:
        page.press("#question", "Enter")
    page.wait_for_function("() => document.getElementById('docs-status').textContent === ''", timeout=120_000)
    return response.value.json()


def check_highlight(page, body: dict, text: str):
    ev = body["evidence"]
    mark = page.locator("#doc-view mark.evidence")
    assert mark.count() == 1
    assert (int(mark.get_attribute("data-start")), int(mark.get_attribute("data-end"))) == (ev["start"], ev["end"])
    assert mark.inner_text() == text[ev["start"]:ev["end"]] == ev["text"]  # code points, as Python counts
    full = page.inner_text("#doc-view")
    assert full == text  # the document itself is shown unchanged around the mark


@needs_browser
def test_document_question_highlights_the_evidence(web, server):
    page = web.open(server.url)
    wait_model(page)
    add_document(page, "report.pdf", "%PDF-1.4", "application/pdf", refused=True)
    assert "report.pdf" in page.inner_text("#docs-status") and page.locator(".doc").count() == 0
    add_document(page, "notes.md", NOTES)
    page.check("#extractive")
    page.click(".qa-options summary")
    page.fill("#threshold", "off")
    body = ask(page, "Who founded Harbor Goods?")
    assert body["extractive"] and not body["no_answer"] and body["evidence"]["source"] == "notes.md"
    assert page.inner_text(".qa-result .qa-answer") == body["answer"]
    check_highlight(page, body, NOTES)
    page.click(".qa-result .chunks summary")
    assert page.locator(".qa-result .chunk-link").count() == len(body["chunks"]) >= 1

    page.fill("#threshold", "1e9")  # nothing clears this: the page must say so
    none = ask(page, "What is the salary of the captain?")
    assert none["no_answer"] and none["evidence"] is None
    assert page.locator(".qa-result").first.locator(".no-answer").inner_text() == "Not in the documents"

    page.reload()  # documents and answers are kept in the browser
    wait_model(page)
    page.click("#tab-docs")
    assert page.locator(".qa-result").count() == 2
    page.locator(".qa-result").nth(1).locator(".evidence-link").click()
    check_highlight(page, body, NOTES)
    assert web.errors == []


# -- /v1/qa ------------------------------------------------------------------------------------


def test_qa_route_answers_with_evidence(server):
    body = {"documents": [{"name": "notes.md", "text": NOTES}], "question": "Who founded Harbor Goods?",
            "extractive": True, "no_answer_threshold": "off", "max_tokens": 8}
    r = httpx.post(server.url + "/v1/qa", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "qa.answer" and out["model"] == MODEL_ID and out["no_answer"] is False
    ev = out["evidence"]
    assert NOTES[ev["start"]:ev["end"]] == ev["text"] == out["answer"]
    assert out["chunks"] and {"source", "start", "end", "score"} <= set(out["chunks"][0])
    assert out["usage"]["completion_tokens"] >= 1 and out["seconds"] > 0
    again = httpx.post(server.url + "/v1/qa", json=body, timeout=120).json()
    assert again["answer"] == out["answer"] and again["usage"]["prompt_tokens"] < out["usage"]["prompt_tokens"]


@pytest.mark.parametrize("body, param, words", [
    ({"question": "q"}, "documents", "non-empty list"),
    ({"documents": [], "question": "q"}, "documents", "non-empty list"),
    ({"documents": ["text"], "question": "q"}, "documents[0]", "object"),
    ({"documents": [{"name": "a", "text": "x"}, {"name": "a", "text": "y"}], "question": "q"}, "documents[1].name",
     "unique"),
    ({"documents": [{"name": "bin", "text": "a\u0000b"}], "question": "q"}, "documents[0].text", "binary"),
    ({"documents": [{"name": "e", "text": "  \n"}], "question": "q"}, "documents", "empty"),
    ({"documents": [{"name": "a", "text": "x"}], "question": "  "}, "question", "empty"),
    ({"documents": [{"name": "a", "text": "x"}], "question": "q", "max_tokens": 0}, "max_tokens", ">= 1"),
    ({"documents": [{"name": "a", "text": "x"}], "question": "q", "max_context": 8}, "max_context", ">= 32"),
    ({"documents": [{"name": "a", "text": "x"}], "question": "q", "extractive": "yes"}, "extractive", "boolean"),
    ({"documents": [{"name": "a", "text": "x"}], "question": "q", "no_answer_threshold": "high"},
     "no_answer_threshold", "number"),
])
def test_qa_route_errors(server, body, param, words):
    r = httpx.post(server.url + "/v1/qa", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"] and "\n" not in error["message"]
    assert error["type"] == "invalid_request_error"


def test_qa_route_needs_the_key_and_limits_the_body(tiny_dir):  # noqa: F811
    model, tokenizer = mlxllama.load(tiny_dir)
    with LiveServer(create_app(model, tokenizer, MODEL_ID, api_key=KEY, max_body_bytes=2048)) as live:
        body = {"documents": [{"name": "a", "text": "x"}], "question": "q"}
        assert httpx.post(live.url + "/v1/qa", json=body).status_code == 401
        big = {"documents": [{"name": "a", "text": "x" * 4096}], "question": "q"}
        r = httpx.post(live.url + "/v1/qa", json=big, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert httpx.get(live.url + "/").status_code == 200  # the page itself needs no key


# -- opening the page from the command line ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", [["serve", "--open"], ["chat", "--web"]])
def test_cli_opens_the_page_in_the_browser(tiny_dir, tmp_path, command):  # noqa: F811
    port = free_port()
    opened = tmp_path / "opened.txt"
    fake = tmp_path / "browser.py"
    fake.write_text(f"import sys\nopen({str(opened)!r}, 'w').write(sys.argv[1])\n")
    env = {**os.environ, "BROWSER": f"{sys.executable} {fake} %s"}
    cmd = [sys.executable, "-m", "mlxllama", *command, "--model", str(tiny_dir), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 90
        while not (opened.exists() and opened.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "late"
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/"
        assert opened.read_text() == url
        assert httpx.get(url).status_code == 200  # it was up when the browser was told
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"chat page: http://127.0.0.1:{port}/" in out


def test_chat_web_refuses_terminal_options_in_one_line(tiny_dir):  # noqa: F811
    r = subprocess.run([sys.executable, "-m", "mlxllama", "chat", "--web", "--model", str(tiny_dir), "--seed", "3"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("error: --seed") and len(r.stderr.strip().splitlines()) == 1


# -- the real default model ------------------------------------------------------------------


@pytest.mark.slow
@needs_browser
def test_real_model_in_the_page(web, default_model_dir):
    model, tokenizer = mlxllama.load(default_model_dir)
    with LiveServer(create_app(model, tokenizer, "smol")) as live:
        page = web.open(live.url)
        wait_model(page, "smol")
        settings(page, **{"max-tokens": 12, "temperature": 0})
        send(page, "What is the capital of France?")
        wait_idle(page)
        assert "Paris" in page.locator(".msg.assistant .content").last.inner_text()
        assert "tokens/s" in page.locator(".msg.assistant .stats").last.inner_text()

        add_document(page, "harbor.txt", NOTES, "text/plain")
        body = ask(page, "Who founded Harbor Goods?")
        assert "Ruiz" in body["answer"] and not body["no_answer"]
        assert "Ruiz" in page.inner_text(".qa-result .qa-answer")
        check_highlight(page, body, NOTES)
        assert "Ana Ruiz" in body["evidence"]["text"]
        assert web.errors == []
