"""`mlxllama serve`: an HTTP server for one model, speaking the OpenAI, Anthropic and Ollama APIs."""

from __future__ import annotations

import click

from .options import cache_bytes, kv_kwargs, kv_options, model_options, prompt_cache_options, request_type


@click.command("serve")
@model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback exposes the model to the network: use --api-key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port to listen on.")
@click.option("--ollama", is_flag=True,
              help="Also listen on Ollama's port 11434, for apps that only know Ollama's address.")
@click.option("--api-key", envvar="MLXLLAMA_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' (or 'x-api-key: KEY') on every API request "
                   "(or set MLXLLAMA_API_KEY).")
@click.option("--served-model-name", "served_model_names", multiple=True, metavar="NAME",
              help="A name clients may use for the model (repeatable; the first is the one responses carry). "
                   "Default: the model's repo id or folder name.")
@click.option("--accept-any-model", is_flag=True,
              help="Answer requests naming any model with this one (for tools that hard-code a model name).")
@click.option("--allowed-origins", "allowed_origins", multiple=True, metavar="ORIGIN",
              help="Let web pages from ORIGIN (e.g. http://localhost:3000, or '*') call the server "
                   "(CORS; repeatable). Default: no CORS headers.")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests (or choices of n>1 requests) decoded together in one batch.")
@click.option("--max-queue", type=click.IntRange(min=0), default=16, show_default=True,
              help="Requests that may wait for a batch slot; beyond that the server answers 429.")
@click.option("--max-body-bytes", type=click.IntRange(min=1024), default=1 << 20, show_default=True,
              help="Largest request body accepted (413 beyond).")
@click.option("--max-tokens", type=request_type("max_tokens"), default=512, show_default=True,
              help="max_tokens for requests that do not set it.")
@click.option("--temperature", "--temp", "temperature", type=request_type("temp"), default=0.0, show_default=True,
              help="temperature for requests that do not set one: 0 decodes greedily, as mlx-lm's server does "
                   "(the OpenAI API's own default is 1.0).")
@click.option("--open", "open_browser", is_flag=True, help="Open the chat page in the default browser.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
@kv_options
@prompt_cache_options
@click.option("--max-kv-bytes", default=None,
              help="KV cache budget for the requests in flight (e.g. 8GB; default: half the machine's memory). "
                   "A request that can never fit gets 400, one that must wait 503 with Retry-After.")
def serve_command(model, adapter_path, dtype, host, port, ollama, api_key, served_model_names, accept_any_model,
                  allowed_origins, max_batch, max_queue, max_body_bytes, max_tokens, temperature, open_browser,
                  log_level, max_kv_bytes, **opts):
    """Serve a model over the OpenAI API (chat and text completions, responses, document questions),
    Anthropic's Messages API and Ollama's API, streamed or not, with a chat page at http://HOST:PORT/
    and Prometheus metrics at /metrics."""
    from ..engine.disk import parse_bytes
    from ..errors import InputError
    from ..serve import serve

    kv = kv_kwargs(opts)
    try:
        budget = parse_bytes(max_kv_bytes) if max_kv_bytes is not None else None
    except ValueError as e:
        raise InputError(f"--max-kv-bytes: {e}") from None
    serve(model, adapter_path=adapter_path, host=host, port=port, api_key=api_key or None, max_batch=max_batch,
          max_queue=max_queue, max_body_bytes=max_body_bytes, max_tokens=max_tokens, temperature=temperature, dtype=dtype,
          log_level=log_level, served_model_names=list(served_model_names) or None, accept_any_model=accept_any_model,
          allowed_origins=list(allowed_origins) or None, ollama=ollama, open_browser=open_browser,
          prompt_cache_bytes=0 if opts["no_prompt_cache"] else cache_bytes(opts), max_kv_bytes=budget, **kv)
