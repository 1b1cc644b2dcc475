"""A multi-turn conversation that reuses its KV cache across turns (and, given a prefix cache or a
session file, across processes)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

from .errors import InputError
from .generate import check_kv, stream_generate
from .generation_options import check_options, keywords
from .models import make_cache

SESSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def session_path(name: str) -> Path:
    """Where `mlxllama chat --session NAME` keeps a conversation: sessions/ beside the prompt cache."""
    from .engine.disk import sessions_folder

    if not SESSION_NAME.match(name or ""):
        raise InputError(f"a session name is letters, digits, '.', '_' and '-' (up to 100), got {name!r}")
    return sessions_folder() / f"{name}.safetensors"


class ChatSession:
    """Keeps messages and the cache of everything already processed, so each turn costs only its
    own new tokens. An interrupted answer is kept as far as it got.

    prefix_cache: an engine.PrefixCache asked for the conversation's beginning whenever the cache
    starts empty (a system prompt computed before, in this process or, with a disk tier, another)
    and given the conversation after each turn. session: a file the conversation and its KV cache
    are saved to after each turn and resumed from when it exists (engine.files layout)."""

    def __init__(self, model, tokenizer, system_prompt: str | None = None, *, prefix_cache=None,
                 session: str | Path | None = None, **gen_kwargs):
        self.model, self.tokenizer, self.system_prompt = model, tokenizer, system_prompt
        check_options(gen_kwargs, keywords(stream_generate))
        check_kv(model, gen_kwargs.get("kv_bits"), gen_kwargs.get("kv_group_size", 64), gen_kwargs.get("max_kv_size"))
        self.gen_kwargs = gen_kwargs
        self.prefix_cache = prefix_cache if gen_kwargs.get("max_kv_size") is None else None  # rotating: not cached
        self.session = Path(session) if session is not None else None
        self.reused = 0  # prompt tokens of the last turn that came from a cache
        self.reset()
        if self.session is not None and self.session.is_file():
            self._resume()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        self.cache = make_cache(self.model, self.gen_kwargs.get("max_kv_size"))
        self.cached_tokens: list[int] = []

    def _render(self) -> list[int]:
        if self.tokenizer.has_chat_template:
            return list(self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=True))
        text = "".join(f"{m['role']}: {m['content']}\n" for m in self.messages) + "assistant:"
        return self.tokenizer.encode(text)

    def _kinds(self) -> tuple[str, ...]:
        from .engine import kind_of

        bits = self.gen_kwargs.get("kv_bits")
        return ("float",) if bits is None else (kind_of(bits, self.gen_kwargs.get("kv_group_size", 64)), "float")

    def _new_tokens(self, tokens: list[int]) -> list[int]:
        """Trims the cache back to the common prefix with what is cached and returns the rest."""
        common = 0
        for a, b in zip(self.cached_tokens, tokens):
            if a != b:
                break
            common += 1
        common = min(common, len(tokens) - 1)  # always feed at least one token
        drop = len(self.cached_tokens) - common
        if drop and (not all(c.is_trimmable() for c in self.cache) or any(c.trim(drop) != drop for c in self.cache)):
            self.cache = make_cache(self.model, self.gen_kwargs.get("max_kv_size"))
            common = 0
        if common == 0 and self.prefix_cache is not None:
            hit = self.prefix_cache.lookup(tokens, self._kinds())
            if hit is not None:
                from .engine.batch import KVQuant, caches_from_states

                quant = KVQuant(self.gen_kwargs.get("kv_bits"), self.gen_kwargs.get("kv_group_size", 64))
                self.cache = caches_from_states(self.model, hit.states, quant)
                common = hit.length
        self.reused = common
        self.cached_tokens = tokens[:common]
        return tokens[common:]

    def send(self, text: str) -> Iterator[str]:
        """Adds a user message and yields the answer's text pieces."""
        self.messages.append({"role": "user", "content": text})
        tokens = self._render()
        new = self._new_tokens(tokens)
        answer, generated = "", []
        try:
            for r in stream_generate(self.model, self.tokenizer, new, prompt_cache=self.cache,
                                     lookup_context=self.cached_tokens, **self.gen_kwargs):
                answer += r.text
                if r.token >= 0:
                    generated.append(r.token)
                yield r.text
        finally:
            self.messages.append({"role": "assistant", "content": answer})
            # The cache holds the prompt and the generated tokens the model has already consumed.
            consumed = self.cache[0].offset if self.cache else 0
            seen = tokens + generated
            if consumed <= len(seen):
                self.cached_tokens = seen[:consumed]
            else:
                self.cache = make_cache(self.model, self.gen_kwargs.get("max_kv_size"))
                self.cached_tokens = []
            self._keep()

    # -- keeping the conversation ----------------------------------------------------------

    def _states(self) -> tuple[list, str]:
        from .engine import kind_of

        states = [c.state for c in self.cache]
        bits = getattr(self.cache[0], "bits", None)
        return states, kind_of(bits, getattr(self.cache[0], "group_size", 64))

    def _keep(self) -> None:
        if not self.cached_tokens or self.gen_kwargs.get("max_kv_size") is not None:
            return
        states, kind = self._states()
        if self.prefix_cache is not None:
            self.prefix_cache.insert(self.cached_tokens, states, kind)
        if self.session is not None:
            self.save(self.session)

    def save(self, path: str | Path) -> None:
        """Writes the conversation and its KV cache to `path` (atomically)."""
        from .engine.files import save_prompt_cache

        states, kind = self._states()
        save_prompt_cache(path, states, kind, tokens=self.cached_tokens, model=self.model, tokenizer=self.tokenizer,
                          metadata={"mlxllama_messages": json.dumps(self.messages, ensure_ascii=False)})

    def _resume(self) -> None:
        """Continues the conversation saved in the session file; a file that does not fit this model
        is reported, and the conversation starts over (the file is replaced after the first turn)."""
        import logging

        from .engine.batch import KVQuant, caches_from_states
        from .engine.files import CacheFileError, check_fits, load_prompt_cache

        try:
            states, kind, meta = load_prompt_cache(self.session)
            check_fits(self.session, states, self.model, self.tokenizer, meta)
            messages = json.loads(meta.get("mlxllama_messages", "[]"))
            tokens = json.loads(meta.get("mlxllama_tokens", "[]"))
        except (CacheFileError, ValueError) as e:
            logging.getLogger("mlxllama.cache").warning("starting a new conversation: %s", e)
            return
        quant = KVQuant(*(int(x) for x in kind[1:].split("g"))) if kind != "float" else KVQuant()
        self.messages = messages
        self.cache = caches_from_states(self.model, states, quant)
        self.cached_tokens = tokens[: self.cache[0].offset]
