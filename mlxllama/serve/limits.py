"""Limits on what a request may carry before any route sees it: its header block (431 beyond), and
the text of its JSON body (a lone UTF-16 surrogate such as "\\ud800" parses in Python's json but is
not Unicode, so nothing downstream could encode it)."""

from __future__ import annotations

import json
from typing import Any

MAX_HEADER_BYTES = 32 * 1024  # all header names and values together (Node.js allows 16 KiB, nginx 32 KiB)
MAX_HEADERS = 100             # cpp-httplib's (llama.cpp's server) limit


class HeaderLimit:
    """Answers 431 Request Header Fields Too Large, with the API's error body, beyond the limits."""

    def __init__(self, app, error_response, api_error):
        self.app, self.error_response, self.api_error = app, error_response, api_error

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = scope["headers"]
            size = sum(len(k) + len(v) for k, v in headers)
            if len(headers) > MAX_HEADERS or size > MAX_HEADER_BYTES:
                error = self.api_error(431, f"the request headers are too large ({len(headers)} headers, {size} "
                                       f"bytes; at most {MAX_HEADERS} headers and {MAX_HEADER_BYTES} bytes)",
                                       code="headers_too_large")
                await self.error_response(error, scope.get("path", ""))(scope, receive, send)
                return
        await self.app(scope, receive, send)


def lone_surrogate(body: bytes, value: Any) -> bool:
    """Whether the parsed body holds a lone surrogate (only possible through a \\uD800-\\uDFFF escape)."""
    if b"\\ud" not in body and b"\\uD" not in body:
        return False
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
