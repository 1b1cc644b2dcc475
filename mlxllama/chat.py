"""A multi-turn conversation that reuses its KV cache across turns."""

from __future__ import annotations

from typing import Iterator

from .generate import stream_generate
from .models import make_cache


class ChatSession:
    """Keeps messages and the cache of everything already processed, so each turn costs only its
    own new tokens. An interrupted answer is kept as far as it got."""

    def __init__(self, model, tokenizer, system_prompt: str | None = None, **gen_kwargs):
        self.model, self.tokenizer, self.system_prompt = model, tokenizer, system_prompt
        self.gen_kwargs = gen_kwargs
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        self.cache = make_cache(self.model, self.gen_kwargs.get("max_kv_size"))
        self.cached_tokens: list[int] = []

    def _render(self) -> list[int]:
        if self.tokenizer.has_chat_template:
            return list(self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, tokenize=True))
        text = "".join(f"{m['role']}: {m['content']}\n" for m in self.messages) + "assistant:"
        return self.tokenizer.encode(text)

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
