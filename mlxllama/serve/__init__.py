"""OpenAI-compatible HTTP server: `mlxllama serve` (see app.py for the routes, engine.py for scheduling)."""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import threading
import time

from ..errors import InputError

from .app import create_app
from .web import local_host, page_url

__all__ = ["create_app", "model_id_for", "serve"]

LOOPBACK_NAMES = ["localhost", "127.0.0.1", "::1", "[::1]"]

log = logging.getLogger("mlxllama.serve")


def model_id_for(model: str | os.PathLike | None, model_dir: str) -> str:
    """The name clients use for the served model: the repo id the user gave, else the folder name."""
    from ..hub import is_repo_id
    from ..paths import DEFAULT_MODEL_NAME

    if model is None or str(model) == "":
        return DEFAULT_MODEL_NAME
    text = str(model)
    if is_repo_id(text) and not os.path.isdir(text):
        return text
    return os.path.basename(os.path.normpath(model_dir)) or text


def mx_metal_available() -> bool:
    from .. import device

    return device.working_set_bytes() is not None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


OLLAMA_PORT = 11434


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, made before the model loads, so that a port in use is one
    line at once (InputError) instead of a failure after a long load."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, IndexError) as e:
        raise InputError(f"cannot listen on {host}:{port}: {e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise InputError(f"port {port} on {host} is already in use (another server?); choose one with --port") from None
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(model: str | os.PathLike | None = None, *, adapter_path: str | None = None, host: str = "127.0.0.1",
          port: int = 8080, api_key: str | None = None, max_batch: int = 8, max_queue: int = 16,
          max_body_bytes: int = 1 << 20, max_tokens: int = 512, temperature: float = 0.0,
          dtype: str | None = None, log_level: str = "info", served_model_names: list[str] | None = None,
          accept_any_model: bool = False, allowed_origins: list[str] | None = None, ollama: bool = False,
          open_browser: bool = False, prompt_cache_bytes: int = 2 << 30, kv_bits: int | None = None,
          kv_group_size: int = 64, quantized_kv_start: int = 0, max_kv_bytes: int | None = None) -> None:
    """Binds the port(s), loads the model and serves it until interrupted.

    ollama: also listen on Ollama's port 11434 (same host), for apps that only know that address;
    open_browser: open the chat page once the server answers. prompt_cache_bytes: the in-memory
    prefix cache shared by requests (0: off); max_kv_bytes: the KV budget (None: half the
    machine's memory)."""
    import uvicorn

    from ..engine import PrefixCache
    from ..generate import check_kv
    from ..loader import load
    from .engine import default_max_kv_bytes

    sockets = [bind(host, port)]
    try:
        if ollama and port != OLLAMA_PORT:
            sockets.append(bind(host, OLLAMA_PORT))
        llm, tokenizer = load(model, adapter_path=adapter_path, dtype=dtype)
        check_kv(llm, kv_bits, kv_group_size)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    from .. import device

    device.wire_memory()  # Metal: keep the model's memory wired so it is not paged out
    model_id = model_id_for(model, llm.model_dir)
    loopback = is_loopback(host)
    app = create_app(llm, tokenizer, model_id, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                     max_body_bytes=max_body_bytes, default_max_tokens=max_tokens, default_temperature=temperature,
                     allowed_hosts=LOOPBACK_NAMES if loopback else None, served_model_names=served_model_names,
                     accept_any_model=accept_any_model, allowed_origins=allowed_origins,
                     prefix_cache=PrefixCache(prompt_cache_bytes) if prompt_cache_bytes > 0 else None,
                     kv_bits=kv_bits, kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start,
                     max_kv_bytes=max_kv_bytes if max_kv_bytes is not None else default_max_kv_bytes())
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(levelname)s: %(message)s")
    if not loopback and api_key is None:
        log.warning("listening on %s without --api-key: anyone who can reach this address can use the model", host)
    shown = f"[{host}]" if ":" in host else host
    names = ", ".join(repr(n) for n in (served_model_names or [model_id]))
    log.info("serving %s on http://%s:%d/v1%s", names, shown, port,
             f" (and Ollama's API on port {OLLAMA_PORT})" if len(sockets) > 1 else "")
    url = page_url(host, port)
    print(f"chat page: {url}", flush=True)
    if open_browser:
        threading.Thread(target=open_when_up, args=(url, host, port), daemon=True).start()
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=sockets)


def open_when_up(url: str, host: str, port: int, timeout: float = 120.0) -> None:
    """Opens `url` in the default browser as soon as the server accepts connections."""
    import webbrowser

    host = local_host(host)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=2).close()
            break
        except OSError:
            time.sleep(0.2)
    if not webbrowser.open(url):
        log.warning("could not open a browser: open %s yourself", url)
