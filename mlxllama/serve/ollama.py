"""Ollama's API: GET /api/version, /api/tags, /api/ps; POST /api/show, /api/chat, /api/generate.

A chat or generate request is rewritten as the OpenAI body it means (options -> sampling fields)
and checked by the same parser, so both dialects accept and refuse the same settings. Streaming is
Ollama's default: NDJSON, one object per line, the last with "done": true and the counts.
Errors are {"error": "message"}.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .engine import Delta, Done
from .fields import REFUSED
from .schemas import APIError, bad, parse_chat, parse_completion

API_VERSION = "0.9.0"  # the Ollama API level these routes follow
SAMPLING_OPTIONS = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "repeat_penalty", "repeat_last_n",
                    "presence_penalty", "frequency_penalty")


def error_body(e: APIError) -> dict[str, Any]:
    return {"error": e.message}


def now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def tagged(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _options(body: dict) -> dict[str, Any]:
    """`options` (and the top-level fields Ollama also takes) as OpenAI request fields."""
    options = body.get("options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise bad("options", "'options' must be an object", "invalid_type")
    out = {k: options[k] for k in SAMPLING_OPTIONS if options.get(k) is not None}
    out.update({k: options[k] for k in REFUSED if k in options})
    n = options.get("num_predict")
    if n is not None:
        if not isinstance(n, int) or isinstance(n, bool) or n == 0 or n < -2:
            raise bad("num_predict", f"'num_predict' must be -1 (no limit), -2 (fill the context) or >= 1, got {n!r}")
        out["n_predict" if n < 0 else "max_tokens"] = -1 if n < 0 else n
    for name in ("images", "tools", "suffix", "template", "context"):
        if body.get(name):
            raise bad(name, f"'{name}' is not supported by this server", "unsupported_parameter")
    fmt = body.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    elif fmt not in (None, ""):
        raise bad("format", "'format' must be \"json\" or a JSON schema", "invalid_value")
    if body.get("think") not in (None, False):
        raise bad("think", "this model does not support thinking", "unsupported_parameter")
    out["stream"] = body.get("stream", True)  # Ollama streams unless told not to
    return out


class Ollama:
    """The handlers; `h` is the app's Handlers (key check, body reading, the engine)."""

    def __init__(self, h):
        self.h = h
        self.loaded_at = now()
        folder = Path(getattr(h.model, "model_dir", "") or ".")
        try:
            quant = json.loads((folder / "config.json").read_text()).get("quantization") or {}
        except (OSError, ValueError, AttributeError):
            quant = {}
        self.bits = quant.get("bits") if isinstance(quant, dict) else None
        self.size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) if folder.is_dir() else 0
        self.digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()
        self.parameters = parameter_size(h.model, self.bits or 32)

    # -- the model ---------------------------------------------------------------------------------

    def _model(self, body: Any) -> str:
        if not isinstance(body, dict):
            raise bad(None, "the request body must be a JSON object", "invalid_json")
        name = body.get("model", body.get("name"))
        if not isinstance(name, str) or not name:
            raise bad("model", "'model' is required", "missing")
        names = self.h.settings.names
        for candidate in (name, name.removesuffix(":latest")):
            if candidate in names:
                return candidate if candidate in names.names else names.primary
        raise APIError(404, f"model '{name[:200]}' not found", param="model")

    def details(self) -> dict[str, Any]:
        family = getattr(getattr(self.h.model, "args", None), "model_type", "llama")
        return {"parent_model": "", "format": "safetensors", "family": family, "families": [family],
                "parameter_size": self.parameters, "quantization_level": f"Q{self.bits}" if self.bits else "F16"}

    def entry(self, name: str) -> dict[str, Any]:
        return {"name": tagged(name), "model": tagged(name), "modified_at": self.loaded_at, "size": self.size,
                "digest": self.digest, "details": self.details()}

    # -- routes --------------------------------------------------------------------------------------

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": API_VERSION})

    async def tags(self, request: Request) -> Response:
        self.h.check_key(request)
        return JSONResponse({"models": [self.entry(n) for n in self.h.settings.names]})

    async def ps(self, request: Request) -> Response:
        self.h.check_key(request)
        models = []
        for n in self.h.settings.names:
            e = self.entry(n)
            models.append({**e, "expires_at": "2999-01-01T00:00:00Z", "size_vram": e["size"]})  # loaded while serving
        return JSONResponse({"models": models})

    async def show(self, request: Request) -> Response:
        self.h.check_key(request)
        name = self._model(await self.h.read_json(request))
        args = getattr(self.h.model, "args", None)
        arch = getattr(args, "model_type", "llama")
        info = {"general.architecture": arch}
        for key, attr in (("context_length", "max_position_embeddings"), ("embedding_length", "hidden_size"),
                          ("block_count", "num_hidden_layers"), ("attention.head_count", "num_attention_heads"),
                          ("attention.head_count_kv", "num_key_value_heads"), ("vocab_size", "vocab_size")):
            if getattr(args, attr, None) is not None:
                info[f"{arch}.{key}"] = getattr(args, attr)
        template = getattr(self.h.tokenizer, "chat_template", None)
        return JSONResponse({"modelfile": f"FROM {name}\n", "parameters": "", "template": template or "",
                             "details": self.details(), "model_info": info, "capabilities": ["completion"],
                             "modified_at": self.loaded_at})

    async def chat(self, request: Request) -> Response:
        self.h.check_key(request)
        body = await self.h.read_json(request)
        name = self._model(body)
        messages = body.get("messages")
        if messages in (None, []):  # Ollama's way to load (or, with keep_alive 0, unload) a model
            reason = "unload" if body.get("keep_alive") in (0, "0", "0s") else "load"
            return JSONResponse({"model": name, "created_at": now(), "message": {"role": "assistant", "content": ""},
                                 "done": True, "done_reason": reason})
        if isinstance(messages, list):
            for i, m in enumerate(messages):
                if isinstance(m, dict) and (m.get("images") or m.get("tool_calls")):
                    raise bad(f"messages[{i}]", "images and tool calls are not supported by this server",
                              "unsupported_parameter")
        messages = [{k: v for k, v in m.items() if k in ("role", "content")} if isinstance(m, dict) else m
                    for m in messages] if isinstance(messages, list) else messages
        parsed = parse_chat({"messages": messages, **_options(body)}, self.h.settings.names)
        return await self._answer(request, parsed, name, "chat")

    async def generate(self, request: Request) -> Response:
        self.h.check_key(request)
        body = await self.h.read_json(request)
        name = self._model(body)
        prompt = body.get("prompt")
        if not prompt:  # load (or unload) the model
            reason = "unload" if body.get("keep_alive") in (0, "0", "0s") else "load"
            return JSONResponse({"model": name, "created_at": now(), "response": "", "done": True, "done_reason": reason})
        if not isinstance(prompt, str):
            raise bad("prompt", "'prompt' must be a string", "invalid_type")
        options = _options(body)
        if body.get("raw"):
            parsed = parse_completion({"prompt": prompt, **options}, self.h.settings.names)
        else:  # Ollama applies the model's template: system + the prompt as a user turn
            system = body.get("system")
            if system is not None and not isinstance(system, str):
                raise bad("system", "'system' must be a string", "invalid_type")
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            parsed = parse_chat({"messages": messages, **options}, self.h.settings.names)
        return await self._answer(request, parsed, name, "generate")

    # -- answers ---------------------------------------------------------------------------------------

    def _line(self, name: str, kind: str, text: str, done: Done | None, started: float) -> dict[str, Any]:
        out: dict[str, Any] = {"model": name, "created_at": now()}
        if kind == "chat":
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["response"] = text
        out["done"] = done is not None
        if done is not None:
            out.update(done_reason=done.finish_reason, total_duration=int((time.perf_counter() - started) * 1e9),
                       load_duration=0, prompt_eval_count=done.prompt_tokens,
                       prompt_eval_duration=int(done.prompt_seconds * 1e9), eval_count=done.completion_tokens,
                       eval_duration=int(done.decode_seconds * 1e9))
        return out

    async def _answer(self, request: Request, parsed, name: str, kind: str) -> Response:
        run = await self.h.start(request, parsed)
        if parsed.stream:
            return StreamingResponse(self._stream(run, name, kind), media_type="application/x-ndjson")
        try:
            (choice,) = await run.collect()
        finally:
            run.close()
        return JSONResponse(self._line(name, kind, choice.text, choice.done, run.started))

    async def _stream(self, run, name: str, kind: str) -> AsyncIterator[str]:
        try:
            async for _, event in run.events():
                if isinstance(event, Delta):
                    if event.text:
                        yield json.dumps(self._line(name, kind, event.text, None, run.started), ensure_ascii=False) + "\n"
                elif isinstance(event, Done):
                    yield json.dumps(self._line(name, kind, "", event, run.started)) + "\n"
                else:
                    yield json.dumps({"error": event.message}) + "\n"
                    return
        finally:
            run.close()


def parameter_size(model, bits: int) -> str:
    """The parameter count as Ollama writes it ("135M", "1.2B"); packed 4-bit weights counted unpacked."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    total = 0
    for key, value in tree_flatten(model.parameters()):
        if key.endswith((".scales", ".biases")):  # quantization metadata, not parameters
            continue
        total += value.size * (32 // bits if value.dtype == mx.uint32 else 1)
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if total >= scale:
            return f"{total / scale:.3g}{unit}"
    return str(total)
